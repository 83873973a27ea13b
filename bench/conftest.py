"""Benchmark harness of selora_kernels: baselines timed in the same process, results kept as JSON data
(bench/README.md). This file holds the pytest side (the --benchmark option, opt-in skipping, the `harness`
fixture, outcomes, the terminal summary); the harness itself is bench/harness.py.

    pytest bench/                     # collected, every case SKIPPED (seconds): benchmarks are opt-in
    pytest bench/ --benchmark         # run them (same as --benchmark-enable)

Environment:
    SELORA_BENCH_RESULTS_DIR   where the JSON goes (default bench/results)
    SELORA_BENCH_BUDGET_S      wall-clock budget of the session in seconds: cases that start after it are
                               skipped ("budget"), so a time-boxed GPU call still writes its JSON
    SELORA_BENCH_DEVICES       "cpu", "cuda" or "cpu,cuda" (default: cpu, plus cuda when available)
    SELORA_BENCH_QUICK=1       fewer rounds (smoke runs)
    SELORA_GIT_COMMIT          commit to record when the tree has no .git (a copied working tree)
    SELORA_BENCH_CPU_THREADS   torch threads for the CPU cases (default 1: per-layer timings that other
                               processes on a shared machine disturb least; 0 = torch's default)

The ``benchmark`` fixture of pytest-benchmark receives our path's round samples and the whole case as
``extra_info``, so ``--benchmark-json`` and its table work too; the ratios come from our harness, whose
timer is the same for our path and every baseline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from bench.harness import BENCH_DIR, BenchHarness

SKIP_REASON = "benchmarks run only with `pytest bench/ --benchmark` (or --benchmark-enable)"


# ------------------------------------------------------------------------------------------------ options
def pytest_addoption(parser):
    group = parser.getgroup("selora-bench", "selora_kernels benchmarks")
    group.addoption("--benchmark", action="store_true", default=False, dest="selora_benchmark",
                    help="run the selora_kernels benchmarks in bench/ (otherwise they are skipped)")


def _enabled(config) -> bool:
    return bool(config.getoption("selora_benchmark", False) or config.getoption("benchmark_enable", False)
                or config.getoption("benchmark_only", False))


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own (trylast) pytest_configure reads the options
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: benchmark case that needs a CUDA device")
    config._selora_bench_enabled = _enabled(config)
    if config._selora_bench_enabled and hasattr(config.option, "benchmark_enable"):
        config.option.benchmark_enable = True
        config.option.benchmark_disable = False
        config.option.benchmark_skip = False


def pytest_collect_file(file_path, parent):
    """bench_<op>.py files are test modules (pytest's default pattern is test_*.py)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and file_path.parent == BENCH_DIR \
            and not parent.session.isinitpath(file_path):  # a file named on the command line is collected anyway
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _in_bench(item) -> bool:
    try:
        return BENCH_DIR in Path(str(item.fspath)).resolve().parents
    except (OSError, ValueError):
        return False


def pytest_collection_modifyitems(config, items):
    if getattr(config, "_selora_bench_enabled", False):
        return
    marker = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if _in_bench(item):
            item.add_marker(marker)


# ------------------------------------------------------------------------------------------------ fixtures
_HARNESS: Optional[BenchHarness] = None


@pytest.fixture(scope="session")
def harness(request) -> BenchHarness:
    global _HARNESS
    if _HARNESS is None:
        _HARNESS = BenchHarness(request.config)
    return _HARNESS


try:  # the harness works without pytest-benchmark too: then `benchmark` is None and only our JSON is written
    import pytest_benchmark  # noqa: F401
except ImportError:
    @pytest.fixture
    def benchmark():
        return None


def pytest_runtest_logreport(report):
    if _HARNESS is None or report.when not in ("setup", "call"):
        return
    if report.when == "setup" and report.outcome == "passed":
        return
    entry = {"outcome": report.outcome, "seconds": round(report.duration, 2)}
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        entry["reason"] = str(report.longrepr[2])[:300]
    elif report.outcome == "failed":
        entry["error"] = str(report.longreprtext)[-1500:]
    _HARNESS.outcomes[report.nodeid] = entry


def pytest_sessionfinish(session, exitstatus):
    if _HARNESS is not None and getattr(session.config, "_selora_bench_enabled", False):
        _HARNESS.write(final=True)


def _fmt_ms(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _HARNESS is None or not _HARNESS.records:
        return
    tr = terminalreporter
    tr.section("selora_kernels benchmarks: ours / baseline (median times, same run)")
    tr.write_line(f"device: {_HARNESS.meta['device_name']}; results: {_HARNESS.path}")
    tr.write_line("per case: ours median ms | baseline: median ms, ratio ours/baseline of medians "
                  "[of fastest rounds, CPU]")
    for record in _HARNESS.records:
        parts = []
        for name, entry in record["baselines"].items():
            if "ratio" not in entry:
                parts.append(f"{name} -")
                continue
            minima = f" [{entry['ratio_of_minima']:.2f}]" if entry.get("ratio_of_minima") else ""
            parts.append(f"{name} {entry['time_ms']:.3g}ms x{entry['ratio']:.2f}{minima}")
        tr.write_line(f"{record['op']}[{record['case']}] {record['ours']}={_fmt_ms(record['time_ms'])}ms | "
                      + ", ".join(parts))
        for target in record["targets"]:
            state = {True: "MET", False: "missed", None: "n/a"}[target["met"]]
            value = target["value"]
            shown = f"{value:.3g}" if isinstance(value, (int, float)) else str(value)
            tr.write_line(f"    target {target['name']}: {shown} {target['comparison']} "
                          f"{target['threshold']:g} -> {state}")
    summary = {"met": 0, "missed": 0, "n/a": 0}
    for record in _HARNESS.records:
        for target in record["targets"]:
            summary[{True: "met", False: "missed", None: "n/a"}[target["met"]]] += 1
    tr.write_line(f"targets: {summary['met']} met, {summary['missed']} missed, {summary['n/a']} not measured")
