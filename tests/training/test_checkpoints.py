"""Checkpoints of the fine-tuning program: they hold the epoch's validation result, a fresh run never mixes
with an earlier run's checkpoints in the same folder, and re-saving a step replaces it."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from selora_kernels.config import SeLoRAConfig
from selora_kernels.data.tiny_pipeline import build_tiny_pipeline
from selora_kernels.experiments.finetune import FinetuneOptions, run_finetune


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    build_tiny_pipeline(folder, seed=0)
    return folder


def options(folder, out, **overrides):
    # 8 synthetic images -> 6 train, batch 2 -> 3 steps an epoch
    values = dict(output_dir=str(out), pretrained=str(folder), dataset="synthetic", synthetic_count=8,
                  resolution=32, epochs=2, batch_size=2, selora=SeLoRAConfig(interval=3, threshold=1.0), seed=0,
                  progress=False)
    values.update(overrides)
    return FinetuneOptions(**values)


def test_epoch_end_checkpoint_holds_that_epochs_validation(tiny_folder, tmp_path):
    out = tmp_path / "run"
    run_finetune(options(tiny_folder, out, max_steps=6))
    with open(out / "validation.csv", newline="") as handle:
        first_epoch = next(csv.DictReader(handle))
    state = torch.load(out / "checkpoints" / "step-0000003" / "training_state.pt", weights_only=False)
    assert state["best_validation"] == pytest.approx(float(first_epoch["validation_loss"]))


def test_fresh_run_moves_an_earlier_run_aside_and_resume_finds_its_own_checkpoint(tiny_folder, tmp_path):
    out = tmp_path / "run"
    run_finetune(options(tiny_folder, out, max_steps=6))
    run_finetune(options(tiny_folder, out, max_steps=3, epochs=1))  # fresh run, same folder
    previous = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1 and (previous[0] / "checkpoints" / "step-0000006").is_dir()
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["checkpoint"] == "step-0000003"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-0000003"]
    resumed = run_finetune(options(tiny_folder, out, max_steps=6, resume=str(out)))
    assert resumed.steps == 6
    assert (out / "checkpoints" / "step-0000006").is_dir()
