"""The benchmark suite and the one-call GPU script work where CI runs (no GPU): the `--benchmark` flag is
known, benchmarks are skipped quickly without it, and `bench/gpu_run.sh --dry-run` succeeds and writes its
summary. Nothing here times anything."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(args, timeout, env=None):
    environment = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    environment.pop("PYTEST_ADDOPTS", None)
    start = time.monotonic()
    result = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                            env=environment)
    return result, time.monotonic() - start


def test_benchmark_flag_is_known_and_collection_works():
    result, _ = _run([sys.executable, "-m", "pytest", "bench/", "--benchmark", "--co", "-q",
                      "-p", "no:cacheprovider"], timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    for op_file in ("bench_selora_linear.py", "bench_selora_linear_fisher.py", "bench_capacity.py"):
        assert any(op_file in line for line in collected), f"{op_file} not collected"
    assert any("[cpu-" in line for line in collected)  # CPU cases exist on a machine without a GPU


def test_benchmarks_are_skipped_quickly_without_the_flag():
    result, seconds = _run([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider",
                            "-rs"], timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" not in result.stdout and "skipped" in result.stdout
    assert "--benchmark" in result.stdout  # the skip reason says how to run them
    assert seconds < 60, f"skipping the benchmarks took {seconds:.0f} s"


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_gpu_run_dry_run_succeeds_and_writes_summary(tmp_path):
    out = tmp_path / "out"
    result, _ = _run(["bash", "bench/gpu_run.sh", "--dry-run"], timeout=240,
                     env={"OUT": str(out), "PYTHON": sys.executable})
    log = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["ok"] is True, summary
    steps = {step["name"]: step for step in summary["steps"]}
    for name in ("files", "versions", "package", "syntax", "bench_collect"):
        assert steps[name]["status"] == "ok", (name, steps[name], log)
    assert "nvidia_smi" in steps and steps["nvidia_smi"]["status"] == "skipped"
    assert (out / "logs.tar.gz").is_file()
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8 and all(set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                  "0123456789._-") for n in names), names


def _harness_class():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import harness

    return harness.BenchHarness


def test_paired_increment_within_noise_is_not_a_met_target():
    """Differences scattered around zero (one round even negative): the bootstrap interval holds 0, so the
    increment is unresolved; a clear positive shift is resolved. The fisher benchmark only divides by a
    resolved positive increment, so a 20x target can no longer be "met" from noise."""
    Harness = _harness_class()
    baseline = [10.0, 10.4, 9.8, 10.1, 10.3, 9.9, 10.2, 10.0, 10.1, 9.7, 10.2]
    noisy = [b + d for b, d in zip(baseline, [0.3, -0.31, 0.1, -0.2, 0.25, -0.1, 0.05, -0.3, 0.2, -0.05, 0.0])]
    result = Harness.paired_difference(noisy, baseline)
    assert result["ci_low_ms"] <= 0 <= result["ci_high_ms"] and not result["resolved"]
    shifted = [b + 1.0 + 0.05 * (i % 3) for i, b in enumerate(baseline)]
    result = Harness.paired_difference(shifted, baseline)
    assert result["resolved"] and result["ci_low_ms"] > 0.9 and abs(result["median_ms"] - 1.05) < 1e-9
    assert Harness.paired_difference(shifted, baseline) == result  # seeded: recomputable from the samples
    assert Harness.target("x", None, 20.0, ">=", "")["met"] is None
