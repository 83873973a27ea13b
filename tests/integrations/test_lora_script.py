"""The README's diff on the structure of diffusers' train_text_to_image_lora.py (lora_script_worker.py): trains
SeLoRA (ranks grow past capacity 3 -> 7), saves and resumes through accelerate's save_state / load_state with
the script's own peft hooks bit-identically, in one process and in two (torchrun, gloo), and its final LoRA
file loads with pipe.load_lora_weights and predicts like the trained UNet."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "lora_script_worker.py")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from selora_kernels.data.tiny_pipeline import build_tiny_pipeline
    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    build_tiny_pipeline(folder)
    return str(folder)


def _run(pretrained, out_dir, *args, processes=1):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    command = [WORKER, "--pretrained", pretrained, "--output-dir", str(out_dir), *map(str, args)]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] + command
    result = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _load(out_dir, process=0):
    return torch.load(os.path.join(out_dir, f"final-{process}.pt"))


def _modules(state):
    return {name: entry for name, entry in state.items() if isinstance(entry, dict)}


def _assert_identical(expected, actual, what):
    assert actual["decisions"] == expected["decisions"], f"{what}: decisions differ"
    for name, entry in _modules(expected).items():
        other = actual[name]
        assert (other["rank"], other["capacity"]) == (entry["rank"], entry["capacity"]), f"{what}: {name}"
        for key in ("A", "B", "trial"):
            assert torch.equal(other[key], entry[key]), f"{what}: {name}.{key} differs"
        assert other["adam"].keys() == entry["adam"].keys()
        for key, value in entry["adam"].items():
            assert torch.equal(other["adam"][key], value), f"{what}: {name} optimizer state {key} differs"


def _assert_grew_past_capacity(state):
    modules = _modules(state)
    assert len(modules) == 32  # to_q/k/v/out.0 of the tiny UNet's 8 attention blocks
    assert all(m["rank"] > 3 and m["capacity"] == 7 for m in modules.values())


def test_one_process_grows_resumes_bit_identically_and_exports(pretrained, tmp_path):
    _run(pretrained, tmp_path / "straight", "--max-steps", 6)
    straight = _load(tmp_path / "straight")
    _assert_grew_past_capacity(straight)
    assert straight["lora_relative_difference"] <= 1e-5
    # a crash after step 4: the newest checkpoint is step 3 (rank 4, past the initial capacity 3)
    _run(pretrained, tmp_path / "crashed", "--max-steps", 6, "--stop-at", 4)
    assert sorted(os.listdir(tmp_path / "crashed")) == ["checkpoint-3"]
    _run(pretrained, tmp_path / "crashed", "--max-steps", 6, "--resume", "latest")
    _assert_identical(straight, _load(tmp_path / "crashed"), "resumed vs uninterrupted")


def test_gradient_accumulation_resumes_bit_identically(pretrained, tmp_path):
    common = ("--max-steps", 4, "--gradient-accumulation-steps", 2, "--checkpointing-steps", 2)
    _run(pretrained, tmp_path / "straight", *common)
    _run(pretrained, tmp_path / "crashed", *common, "--stop-at", 3)
    _run(pretrained, tmp_path / "crashed", *common, "--resume", "latest")
    straight = _load(tmp_path / "straight")
    assert {m["rank"] for m in _modules(straight).values()} == {5}
    _assert_identical(straight, _load(tmp_path / "crashed"), "accumulation: resumed vs uninterrupted")


def test_two_processes_stay_identical_through_growth_past_capacity_and_resume(pretrained, tmp_path):
    _run(pretrained, tmp_path / "two", "--max-steps", 6, processes=2)
    first, second = _load(tmp_path / "two", 0), _load(tmp_path / "two", 1)
    _assert_grew_past_capacity(first)
    _assert_identical(first, second, "process 1 vs process 0")
    assert first["lora_relative_difference"] <= 1e-5

    _run(pretrained, tmp_path / "two-crashed", "--max-steps", 6, "--stop-at", 4, processes=2)
    _run(pretrained, tmp_path / "two-crashed", "--max-steps", 6, "--resume", "latest", processes=2)
    for process in (0, 1):
        _assert_identical(first, _load(tmp_path / "two-crashed", process), f"resumed process {process}")

    # one process on the same global batch takes the same decisions; the weights agree to rounding, which
    # Adam's normalisation of near-zero gradients amplifies (the UNet sums in another order per batch size)
    _run(pretrained, tmp_path / "one", "--max-steps", 6, "--train-batch-size", 4)
    single = _load(tmp_path / "one")
    assert [d[:2] + d[3:] for d in single["decisions"]] == [d[:2] + d[3:] for d in first["decisions"]]
    for name, entry in _modules(single).items():
        for key in ("A", "B"):
            relative = float((first[name][key] - entry[key]).norm() / entry[key].norm())
            assert relative <= 1e-3, f"{name}.{key}: 2 processes vs 1 differ by {relative:.2e} relative"
