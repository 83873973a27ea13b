"""The fine-tuning program under a 2-process launch (torchrun, gloo on CPU): it runs to the end, both
processes take the same expansion decisions, and one process writes the outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]


def test_two_process_finetune_writes_one_consistent_run(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "python.finetune",
               "--max-steps", "4", "--interval", "2", "--threshold", "1.0", "--output-dir", str(out),
               "--no-progress"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("adapted layers") == 1  # the first process reports
    ranks = json.loads((out / "final_ranks.json").read_text())
    assert set(ranks.values()) == {3}  # lambda 1.0 expands every layer at each of the 2 tests
    with safe_open(str(out / "adapter.safetensors"), "pt") as handle:
        assert len(list(handle.keys())) > 0
    log_steps = [line.split(",")[0] for line in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert log_steps == ["2", "4"]  # one writer: no duplicated rows
