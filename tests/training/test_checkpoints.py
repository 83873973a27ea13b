"""Checkpoints of the fine-tuning program: they hold the epoch's validation result, a fresh run never mixes
with an earlier run's checkpoints in the same folder, and re-saving a step replaces it."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from helpers import small_run
from selora_kernels.experiments.finetune import run_finetune


pytestmark = pytest.mark.usefixtures("one_thread")


def options(folder, out, **overrides):
    return small_run(folder, out, 3, **overrides)


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
