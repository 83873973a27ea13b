"""Checkpoints of a fine-tuning run: written atomically, found again for --resume, checked against the run
that resumes them.

A checkpoint is a folder `<output>/checkpoints/step-XXXXXXX/` holding the method's adapter file and
training_state.pt (step, epoch, best validation loss, optimizer state, method state and description, the
options). It is written in a temp folder and renamed into place; then `checkpoints/latest.json` is pointed at
it (atomic_write), so a crash at any moment leaves the previous checkpoint whole and found.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import canonical_mode
from ..integrations.adapter_io import atomic_write
from ..methods.base import AdapterMethod

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "training_state.pt"
# what a run writes into its output folder (the tiny pipeline cache is shared and stays)
RUN_OUTPUTS = (CHECKPOINT_DIR, "best", "tensorboard", "train_log.csv", "validation.csv", "expansions.csv",
               ADAPTER_FILE, "peft_lora", "final_ranks.json", "rank_heatmap.png")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder from a checkpoint folder or an output folder (via checkpoints/latest.json)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    latest = path / CHECKPOINT_DIR / LATEST
    if latest.is_file():
        return path / CHECKPOINT_DIR / json.loads(latest.read_text())["checkpoint"]
    raise FileNotFoundError(f"--resume {path}: neither a checkpoint folder (with {STATE_FILE}) nor an output "
                            f"folder with {CHECKPOINT_DIR}/{LATEST}")


def move_previous_run_aside(output_dir: Path) -> Optional[Path]:
    """A fresh run in a folder that holds another run's outputs: moves them to previous-<time>/ (nothing is
    deleted, and a later --resume cannot pick up the other run's checkpoints). Returns that folder, if any."""
    leftovers = [output_dir / name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if not leftovers:
        return None
    aside = output_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    for path in leftovers:
        os.replace(path, aside / path.name)
    logger.warning("%s held the outputs of an earlier run: moved to %s (use --resume to continue a run)",
                   output_dir, aside)
    return aside


def save_checkpoint(output_dir: Path, step: int, epoch: int, method: AdapterMethod, optimizer,
                    best_validation: float, options: dict, keep: int) -> Path:
    """Writes checkpoints/step-XXXXXXX atomically (temp folder + rename), points latest.json at it, and keeps
    the newest `keep` checkpoints. optimizer: the torch optimizer (not a wrapper); options: the run's options
    as a dict (a resume checks some of them)."""
    root = output_dir / CHECKPOINT_DIR
    name = checkpoint_name(step)
    final = root / name
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    method.save(tmp / ADAPTER_FILE, extra_metadata={"step": step})
    torch.save({"step": step, "epoch": epoch, "best_validation": best_validation,
                "optimizer": optimizer.state_dict(), "method_state": method.state_dict(),
                "method": method.describe(), "options": options}, tmp / STATE_FILE)
    replaced = None
    if final.exists():  # the same step saved again (end of training, resume): the new one wins
        replaced = root / f".old-{name}-{os.getpid()}"
        os.replace(final, replaced)
    os.replace(tmp, final)
    atomic_write(root / LATEST, lambda path: path.write_text(json.dumps({"checkpoint": name, "step": step},
                                                                        indent=2)))
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    older = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                   and int(p.name.split("-")[1]) < step)
    for stale in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, method: AdapterMethod, options) -> dict:
    """Checks that the checkpoint in `folder` was written by this method with these settings (the method's
    description, batch_size and seed), loads its adapter into `method` and returns the training state."""
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    saved, current = state["method"], method.describe()
    for key in sorted(set(saved) | set(current)):
        # checkpoints written before the released-script rename say "reference_code"
        if canonical_mode(saved.get(key)) != current.get(key):
            raise ValueError(f"--resume {folder}: the checkpoint was trained with {key}={saved.get(key)!r}, "
                             f"this run has {key}={current.get(key)!r}; resume with the same settings")
    for key in ("batch_size", "seed"):
        if state["options"].get(key) != getattr(options, key):
            raise ValueError(f"--resume {folder}: the checkpoint used {key}={state['options'].get(key)!r}, "
                             f"this run has {key}={getattr(options, key)!r}")
    method.load(folder / ADAPTER_FILE)  # ranks and capacities first: the optimizer state fits them
    logger.info("resuming from %s at step %d", folder, state["step"])
    return state


def restore_training_state(state: dict, optimizer, method: AdapterMethod) -> None:
    """Loads the checkpoint's optimizer and method state, after checking the optimizer state fits the
    parameters (same count, same shapes)."""
    saved = state["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_count = sum(len(g["params"]) for g in saved["param_groups"])
    if saved_count != len(params):
        raise ValueError(f"--resume: the checkpoint's optimizer holds {saved_count} parameters, this run's "
                         f"holds {len(params)}: a different model or target set")
    for index, param in enumerate(params):
        for key, value in saved["state"].get(index, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() == param.dim() and value.shape != param.shape:
                raise ValueError(f"--resume: optimizer state {key!r} of parameter {index} has shape "
                                 f"{tuple(value.shape)}, the parameter has {tuple(param.shape)}: the "
                                 f"checkpoint's ranks/capacities disagree with its adapter file")
    optimizer.load_state_dict(saved)
    method.load_state_dict(state["method_state"])
