"""Two processes (torchrun, gloo) crossing capacity twice stay bit-identical, and equal to rounding to one
process on the same global batch: with DDP directly and through accelerate."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "distributed_growth_worker.py")


def _run(out_dir, mode, processes):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    if processes == 1:
        command = [sys.executable, WORKER, str(out_dir), mode]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--standalone", WORKER, str(out_dir), mode]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _run(out, "single", 1)
    return torch.load(out / "single-0.pt")


def _tensors(state):
    for name, module in state.items():
        if name == "decisions":
            continue
        for key in ("A", "B", "trial"):
            yield f"{name}.{key}", module[key]
        for key, value in module["adam"].items():
            yield f"{name}.adam.{key}", value


@pytest.mark.parametrize("mode", ["ddp", "accelerate"])
def test_two_processes_stay_identical_across_growth_past_capacity(mode, single, tmp_path):
    _run(tmp_path, mode, 2)
    first, second = (torch.load(tmp_path / f"{mode}-{rank}.pt") for rank in (0, 1))
    capacities = {m["capacity"] for name, m in first.items() if name != "decisions"}
    assert capacities == {15}, f"expected two growths past capacity (3 -> 7 -> 15), got {capacities}"
    assert first["decisions"] == second["decisions"]
    for (name, a), (_, b) in zip(_tensors(first), _tensors(second)):
        assert torch.equal(a, b), f"{mode}: {name} differs between processes"
    assert [d[:2] + d[3:] for d in first["decisions"]] == [d[:2] + d[3:] for d in single["decisions"]]
    for (name, a), (_, b) in zip(_tensors(first), _tensors(single)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{mode}: {name} vs one process")
