"""The benchmark harness of selora_kernels: baselines timed in the same process, results kept as JSON data
(bench/README.md). bench/conftest.py holds only the pytest side (options, the `harness` fixture, reports).

What one case does: build our path and its baselines on the same inputs, time them in the same process
(interleaved rounds on the CPU, ``triton.testing.do_bench`` medians on a GPU), record each baseline's time,
the ratio ours / baseline, which implementation path ran, and the performance targets (bench/README.md) as
data (met / missed). Timings are never asserted. At session end (and after every case, so a killed run keeps
its cases) the results go to ``bench/results/bench_<device-slug>_<timestamp>.json``.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import pytest

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SCHEMA = "selora_kernels.bench/1"


# ------------------------------------------------------------------------------------------------ metadata
def _slug(text: str, limit: int = 48) -> str:
    text = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return text[:limit].strip("-") or "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> Optional[str]:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as error:  # noqa: BLE001 (a missing or broken package is data, not an error)
        return f"unavailable: {type(error).__name__}: {error}"[:200]


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf / nan
    return value


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return _finite(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


# ------------------------------------------------------------------------------------------------ harness
class BenchHarness:
    """Timers, builders of the baselines, and the recorder of one benchmark session."""

    def __init__(self, config):
        import torch

        self.config = config
        self.torch = torch
        self.started = time.monotonic()
        budget = os.environ.get("SELORA_BENCH_BUDGET_S", "").strip()
        self.budget_s = float(budget) if budget else None
        self.quick = os.environ.get("SELORA_BENCH_QUICK", "") == "1"
        threads = int(os.environ.get("SELORA_BENCH_CPU_THREADS", "1") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.cuda = torch.cuda.is_available()
        wanted = os.environ.get("SELORA_BENCH_DEVICES", "").strip()
        self.devices = [d.strip() for d in wanted.split(",") if d.strip()] if wanted else \
            (["cpu", "cuda"] if self.cuda else ["cpu"])
        self.records: list = []
        self.outcomes: dict = {}
        self.cuda_impl_status = self._import_cuda_impl() if self.cuda else "not imported (no CUDA device)"
        self.meta = self._metadata()
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        results_dir = Path(os.environ.get("SELORA_BENCH_RESULTS_DIR") or BENCH_DIR / "results")
        self.path = results_dir / f"bench_{self.meta['device_slug']}_{stamp}.json"

    # ---------------------------------------------------------------- session facts
    def _import_cuda_impl(self) -> str:
        """The CUDA implementations register themselves on import; make sure that happened."""
        try:
            importlib.import_module("selora_kernels.ops.cuda_impl")
            return "imported"
        except Exception as error:  # noqa: BLE001
            return f"unavailable: {type(error).__name__}: {error}"[:300]

    def _metadata(self) -> dict:
        torch = self.torch
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            device_name = torch.cuda.get_device_name(0)
            device = {"name": device_name, "capability": list(torch.cuda.get_device_capability(0)),
                      "multiprocessors": props.multi_processor_count,
                      "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
            slug = _slug(device_name)
        else:
            device_name = _cpu_model()
            device = {"name": device_name, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
            slug = f"cpu-{_slug(device_name, 40)}-{os.cpu_count()}c"
        commit = os.environ.get("SELORA_GIT_COMMIT") or _git("rev-parse", "HEAD") or "unknown"
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        try:
            from selora_kernels._extension import extension_status

            extension = extension_status()
        except Exception as error:  # noqa: BLE001
            extension = f"unavailable: {type(error).__name__}: {error}"[:300]
        return {
            "device_name": device_name, "device_slug": slug, "device": device,
            "devices_benchmarked": self.devices,
            "host": platform.node(), "platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "triton": _version("triton"), "peft": _version("peft"),
            "pytest_benchmark": _version("pytest_benchmark"),
            "git_commit": commit, "git_dirty": None if dirty is None else bool(dirty),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "extension": extension, "cuda_impl": self.cuda_impl_status,
            "budget_s": self.budget_s, "quick": self.quick,
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "argv": sys.argv[1:],
        }

    def device_or_skip(self, device: str) -> None:
        if device == "cuda" and not self.cuda:
            pytest.skip("CUDA device not available: GPU case")
        if device not in self.devices:
            pytest.skip(f"device {device} not selected (SELORA_BENCH_DEVICES={','.join(self.devices)})")
        self.budget_or_skip()

    def budget_or_skip(self) -> None:
        if self.budget_s is not None and time.monotonic() - self.started > self.budget_s:
            pytest.skip(f"budget: SELORA_BENCH_BUDGET_S={self.budget_s:g} s spent")

    def sync(self, device: str) -> None:
        if device == "cuda":
            self.torch.cuda.synchronize()

    # ---------------------------------------------------------------- timing
    def measure(self, providers: Dict[str, Callable[[], object]], device: str, *, rounds: int = 5,
                iterations: int = 1, warmup: int = 1, setup: Optional[Callable[[str], None]] = None,
                errors: Optional[dict] = None) -> Dict[str, dict]:
        """Median time (ms) of each provider. A provider that raises is dropped and its error recorded.

        CPU: warm-up calls, then `rounds` rounds of `iterations` calls, providers interleaved (and the
        order alternated) so that load from other processes hits every provider alike; median over rounds.
        CUDA: triton.testing.do_bench (median, q20, q80; L2 flushed between calls), or CUDA events around
        single calls when `setup` must run between calls (growth) or Triton is missing.
        `setup(name)` runs, untimed, before every timed call block and warm-up call; with a setup,
        warmup=0 is allowed (the first timed call then includes one-time costs: use for slow, stateful cases).
        """
        errors = {} if errors is None else errors
        if self.quick:
            rounds = max(2, rounds // 2)
        live = {}
        for name, fn in providers.items():
            try:
                for _ in range(warmup if setup is not None else max(1, warmup)):
                    if setup is not None:
                        setup(name)
                    fn()
                self.sync(device)
                live[name] = fn
            except Exception as error:  # noqa: BLE001 (a broken baseline is reported, not fatal)
                errors[name] = f"{type(error).__name__}: {error}"[:500]
        if device == "cuda":
            return self._measure_cuda(live, setup, rounds)
        samples = {name: [] for name in live}
        order = list(live)
        for index in range(rounds):
            for name in (order if index % 2 == 0 else order[::-1]):
                if setup is not None:
                    setup(name)
                fn = live[name]
                start = time.perf_counter()
                for _ in range(iterations):
                    fn()
                samples[name].append((time.perf_counter() - start) / iterations * 1e3)
        return {name: self._summary(values, iterations, "perf_counter, interleaved rounds")
                for name, values in samples.items()}

    def _measure_cuda(self, live, setup, rounds) -> Dict[str, dict]:
        torch = self.torch
        results = {}
        try:
            from triton.testing import do_bench
        except Exception:  # noqa: BLE001
            do_bench = None
        for name, fn in live.items():
            if setup is None and do_bench is not None:
                warm, rep = (5, 20) if self.quick else (10, 50)
                median, q20, q80 = do_bench(fn, warmup=warm, rep=rep, quantiles=[0.5, 0.2, 0.8])
                results[name] = {"median_ms": median, "min_ms": None, "q20_ms": q20, "q80_ms": q80,
                                 "method": "do_bench", "samples_ms": None}
                continue
            values = []
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(max(rounds, 10)):
                if setup is not None:
                    setup(name)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                end.synchronize()
                values.append(start.elapsed_time(end))
            results[name] = self._summary(values, 1, "cuda events, single calls")
        return results

    def measure_paired(self, candidate: Callable[[], object], baseline: Callable[[], object], device: str, *,
                       rounds: int = 21) -> Dict[str, list]:
        """Per-round times (ms) of two providers run back to back in each round (order alternated), for a
        paired statistic of their difference: load that hits a round hits both of its samples."""
        if self.quick:
            rounds = max(5, rounds // 2)
        samples = {"candidate_samples_ms": [], "baseline_samples_ms": []}
        pair = (("candidate_samples_ms", candidate), ("baseline_samples_ms", baseline))
        for fn in (candidate, baseline):
            fn()
        self.sync(device)
        for index in range(rounds):
            for key, fn in (pair if index % 2 == 0 else pair[::-1]):
                if device == "cuda":
                    start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
                    self.torch.cuda.synchronize()
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    samples[key].append(start.elapsed_time(end))
                else:
                    start = time.perf_counter()
                    fn()
                    samples[key].append((time.perf_counter() - start) * 1e3)
        return samples

    @staticmethod
    def paired_difference(candidate_ms, baseline_ms, *, resamples: int = 2000, level: float = 0.95,
                          seed: int = 0) -> dict:
        """Median of the per-round differences candidate - baseline and its percentile-bootstrap confidence
        interval (rounds resampled with replacement, fixed seed: anyone can recompute it from the samples).
        `resolved`: the interval excludes 0, i.e. the difference is outside timing noise."""
        import random

        if len(candidate_ms) != len(baseline_ms) or len(candidate_ms) < 3:
            raise ValueError("paired samples need equal lengths of at least 3 rounds")
        diffs = [c - b for c, b in zip(candidate_ms, baseline_ms)]
        rng = random.Random(seed)
        medians = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
        tail = (1.0 - level) / 2
        low = medians[int(tail * (resamples - 1))]
        high = medians[int(round((1.0 - tail) * (resamples - 1)))]
        return {"statistic": "median of per-round differences, percentile bootstrap", "rounds": len(diffs),
                "median_ms": statistics.median(diffs), "ci_low_ms": low, "ci_high_ms": high, "level": level,
                "resamples": resamples, "seed": seed, "resolved": low > 0 or high < 0}

    @staticmethod
    def _summary(values, iterations, method) -> dict:
        ordered = sorted(values)

        def quantile(q):
            return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

        return {"median_ms": statistics.median(ordered), "min_ms": ordered[0],
                "q20_ms": quantile(0.2), "q80_ms": quantile(0.8),
                "rounds": len(ordered), "iterations": iterations, "method": method, "samples_ms": values}

    # ---------------------------------------------------------------- paths
    def op_path(self, device: str):
        """Which implementation of selora::linear ran last (cuda_impl.last_paths() on a GPU)."""
        if device == "cpu":
            return "reference (torch.library CPU implementation, ops/reference.py)"
        try:
            module = importlib.import_module("selora_kernels.ops.cuda_impl")
        except Exception as error:  # noqa: BLE001
            return f"unknown: selora_kernels.ops.cuda_impl unavailable ({type(error).__name__})"
        last_paths = getattr(module, "last_paths", None)
        if last_paths is None:
            return "unknown: cuda_impl has no last_paths()"
        try:
            return _jsonable(last_paths())
        except Exception as error:  # noqa: BLE001
            return f"unknown: last_paths() raised {type(error).__name__}: {error}"

    # ---------------------------------------------------------------- recording
    def record(self, request, *, op: str, params: dict, ours: str, times: Dict[str, dict], path,
               targets: Optional[list] = None, metrics: Optional[dict] = None,
               errors: Optional[dict] = None, notes: Optional[str] = None, benchmark=None) -> dict:
        """Stores one case: our time, each baseline's time from the same run, ours / baseline ratios."""
        ours_time = times.get(ours, {}).get("median_ms")
        baselines = {}
        for name, timing in times.items():
            if name == ours:
                continue
            entry = {"time_ms": timing["median_ms"], "min_ms": timing.get("min_ms"), "q20_ms": timing["q20_ms"],
                     "q80_ms": timing["q80_ms"]}
            if ours_time is not None and timing["median_ms"] > 0:
                entry["ratio"] = ours_time / timing["median_ms"]  # < 1: ours is faster
                entry["speedup"] = timing["median_ms"] / ours_time if ours_time > 0 else math.inf
                ours_min = times[ours].get("min_ms")
                if ours_min is not None and timing.get("min_ms"):
                    entry["ratio_of_minima"] = ours_min / timing["min_ms"]  # robust to load from others
            baselines[name] = entry
        record = {
            "op": op, "test": request.node.nodeid, "case": request.node.callspec.id
            if hasattr(request.node, "callspec") else request.node.name,
            "params": params, "ours": ours, "path": path,
            "time_ms": ours_time, "min_ms": times.get(ours, {}).get("min_ms"),
            "q20_ms": times.get(ours, {}).get("q20_ms"), "q80_ms": times.get(ours, {}).get("q80_ms"),
            "timing_method": times.get(ours, {}).get("method"),
            "baselines": baselines, "metrics": metrics or {}, "targets": targets or [],
            "errors": errors or {}, "notes": notes,
        }
        if params.get("device") == "cuda":
            self._add_roofline(record, times)
        self.records.append(record)
        self._publish(benchmark, op, record, times.get(ours))
        self.write(final=False)
        return record

    def _add_roofline(self, record: dict, times: Dict[str, dict]) -> None:
        """The case's roofline floors (bench/roofline.py) and, per provider, measured time / estimate."""
        try:
            import roofline

            estimate = roofline.case_estimate(record["op"], record["params"], self.meta["device_name"],
                                              self.torch.get_float32_matmul_precision())
        except Exception as error:  # noqa: BLE001 (a model error must never cost a GPU run its numbers)
            record["errors"]["roofline"] = f"{type(error).__name__}: {error}"[:300]
            return
        if estimate is None:
            return
        for name, floor in estimate["providers"].items():
            measured = times.get(name, {}).get("median_ms")
            if measured is not None and floor["estimate_us"] > 0:
                floor["measured_over_estimate"] = measured * 1e3 / floor["estimate_us"]
        record["roofline"] = estimate

    @staticmethod
    def target(name: str, value, threshold: float, comparison: str, description: str) -> dict:
        """A performance target as data: met when `value comparison threshold` (None/NaN: not measured)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            met = None
        elif comparison == "<=":
            met = value <= threshold
        elif comparison == ">=":
            met = value >= threshold
        elif comparison == "==":
            met = value == threshold
        else:
            raise ValueError(comparison)
        return {"name": name, "value": value, "threshold": threshold, "comparison": comparison,
                "met": met, "description": description}

    def _publish(self, benchmark, op, record, timing) -> None:
        """Hands our path's samples to pytest-benchmark (its table, --benchmark-json)."""
        if benchmark is None:
            return
        try:
            benchmark.group = f"{op}:{record['params'].get('mode', '')}"
            benchmark.extra_info.update(_jsonable({k: record[k] for k in (
                "ours", "path", "time_ms", "baselines", "targets", "metrics", "errors")}))
            samples = (timing or {}).get("samples_ms")
            if not samples:
                samples = [(timing or {}).get("median_ms")] if timing else []
            samples = [s for s in samples if s is not None]
            if samples and getattr(benchmark, "enabled", False) and hasattr(benchmark, "_make_stats"):
                iterations = int(timing.get("iterations") or 1)
                stats = benchmark._make_stats(iterations)
                for value in samples:
                    stats.update(value / 1e3 * iterations)
                benchmark._mode = "selora harness (interleaved rounds)"
        except Exception as error:  # noqa: BLE001 (pytest-benchmark internals changed: keep our JSON)
            record.setdefault("notes_publish", f"pytest-benchmark publish failed: {error}")

    def write(self, final: bool) -> Optional[Path]:
        if not self.records and not final:
            return None
        targets = [t for r in self.records for t in r["targets"]]
        document = {
            "schema": SCHEMA, "complete": final,
            "written": _dt.datetime.now().isoformat(timespec="seconds"),
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "load_average_now": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "metadata": self.meta,
            "ratio_definition": "ratio = our median time / baseline median time (< 1: ours faster); "
                                "speedup = 1 / ratio; ratio_of_minima = the same with the fastest rounds "
                                "(CPU only; less sensitive to other processes)",
            "targets_summary": {
                "met": sum(t["met"] is True for t in targets), "missed": sum(t["met"] is False for t in targets),
                "not_measured": sum(t["met"] is None for t in targets)},
            "cases": self.records,
            "outcomes": self.outcomes,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_jsonable(document), indent=1))
        tmp.replace(self.path)
        return self.path

    # ---------------------------------------------------------------- builders shared by the bench files
    @staticmethod
    def make_peft_linear(base, rank: int, alpha: float, dtype):
        """peft's LoRA Linear around `base` (dropout 0), adapter weights in `dtype` (like against like;
        get_peft_model would keep them fp32 next to a bf16 base), B random so no product is of zeros."""
        import torch
        from peft import LoraConfig, get_peft_model

        class _Holder(torch.nn.Module):
            def __init__(self, proj):
                super().__init__()
                self.proj = proj

            def forward(self, x):
                return self.proj(x)

        model = get_peft_model(_Holder(base), LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                         target_modules=["proj"]))
        layer = model.base_model.model.proj
        with torch.no_grad():
            for module in (layer.lora_A["default"], layer.lora_B["default"]):
                module.to(dtype)
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
        return layer

    @staticmethod
    def make_selora(base, rank: int, alpha: float, generator=None):
        """SeLoRALinear sharing `base`'s frozen weight, `rank` live slots with random A rows and B columns."""
        import torch
        from selora_kernels import SeLoRALinear

        module = SeLoRALinear.from_linear(base, r_init=rank, alpha=alpha)
        with torch.no_grad():
            module.lora_A.zero_()
            module.lora_B.zero_()
            a = torch.randn(rank, module.in_features, generator=generator) / math.sqrt(module.in_features)
            b = torch.randn(module.out_features, rank, generator=generator) * 0.02
            module.lora_A[:rank] = a.to(module.lora_A)
            module.lora_B[:, :rank] = b.to(module.lora_B)
        module.set_live_rank(rank)
        return module
