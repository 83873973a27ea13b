"""Checkpoints that are damaged, interrupted or shared: a manifest of checksums verified on resume, fallback to
the newest intact checkpoint, temp folders of killed writers removed, one run per output folder, and a resume
with another method named as such."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import small_run
from selora_kernels.experiments.finetune import run_finetune

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
STEP2, STEP4 = "step-0000002", "step-0000004"


def options(folder, out, **overrides):  # a checkpoint every 2 steps, 2 kept
    return small_run(folder, out, 2, **overrides)


@pytest.fixture(scope="module")
def four_steps(tiny_folder, tmp_path_factory):
    """An output folder after 4 steps (checkpoints at steps 2 and 4); tests damage copies of it."""
    out = tmp_path_factory.mktemp("four") / "run"
    run_finetune(options(tiny_folder, out, max_steps=4))
    return out


def copy_run(source, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out


def flip_tensor_bytes(path):
    data = bytearray(path.read_bytes())
    for index in range(len(data) - 16, len(data) - 8):  # the end of the file: tensor data, not the header
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def break_header(path):
    data = bytearray(path.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")  # a header length beyond the file: "invalid header length"
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def checkpoint_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("selora_kernels.training")]


def test_checkpoint_manifest_holds_the_checksum_of_every_file(four_steps):
    for name in (STEP2, STEP4):
        folder = four_steps / "checkpoints" / name
        manifest = json.loads((folder / "manifest.json").read_text())
        assert set(manifest["files"]) == {"adapter.safetensors", "training_state.pt"}
        for file_name, entry in manifest["files"].items():
            data = (folder / file_name).read_bytes()
            assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)


@pytest.mark.parametrize("damaged_file, damage", [("adapter.safetensors", flip_tensor_bytes),
                                                  ("adapter.safetensors", break_header),
                                                  ("training_state.pt", truncate)])
def test_resume_falls_back_to_the_newest_intact_checkpoint_with_one_warning(
        tiny_folder, four_steps, tmp_path, caplog, damaged_file, damage):
    out = copy_run(four_steps, tmp_path)
    # cloned: load_file maps the file, and the damage below rewrites it in place
    intact = {k: v.clone() for k, v in load_file(str(out / "checkpoints" / STEP4 / "adapter.safetensors")).items()}
    damage(out / "checkpoints" / STEP4 / damaged_file)
    with caplog.at_level(logging.WARNING):
        resumed = run_finetune(options(tiny_folder, out, max_steps=4, resume=str(out)))
    warnings = checkpoint_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert str(out / "checkpoints" / STEP4 / damaged_file) in warnings[0]
    assert str(out / "checkpoints" / STEP2) in warnings[0]  # where it resumed from
    assert resumed.steps == 4
    # steps 3-4 trained again from step 2: the same adapter as the one that was damaged
    again = load_file(str(out / "checkpoints" / STEP4 / "adapter.safetensors"))
    assert again.keys() == intact.keys()
    assert all(torch.equal(again[k], intact[k]) for k in intact)
    with open(out / "train_log.csv") as handle:
        assert [line.split(",")[0] for line in handle.read().splitlines()[1:]] == ["2", "4"]


def test_resume_without_an_intact_checkpoint_names_the_damaged_files(tiny_folder, four_steps, tmp_path):
    out = copy_run(four_steps, tmp_path)
    flip_tensor_bytes(out / "checkpoints" / STEP4 / "adapter.safetensors")
    truncate(out / "checkpoints" / STEP2 / "training_state.pt")
    with pytest.raises(ValueError) as raised:
        run_finetune(options(tiny_folder, out, max_steps=4, resume=str(out)))
    message = str(raised.value)
    assert str(out / "checkpoints" / STEP4 / "adapter.safetensors") in message
    assert str(out / "checkpoints" / STEP2 / "training_state.pt") in message
    # a checkpoint folder named explicitly is not swapped for another: its damage is the error
    with pytest.raises(ValueError, match=f"{STEP4}/adapter.safetensors.*sha256"):
        run_finetune(options(tiny_folder, out, max_steps=4, resume=str(out / "checkpoints" / STEP4)))


def test_resume_with_another_method_names_both_methods(tiny_folder, four_steps, tmp_path):
    out = copy_run(four_steps, tmp_path)
    with pytest.raises(ValueError, match="written by method 'selora', this run uses method 'lora'"):
        run_finetune(options(tiny_folder, out, max_steps=6, method="lora", resume=str(out)))


# ---------------------------------------------------------------------------- other processes
CHILD = """
import json, os, signal, sys, time
import torch
from selora_kernels.config import SeLoRAConfig
from selora_kernels.experiments.finetune import FinetuneOptions, run_finetune

folder, out, action = sys.argv[1:4]
real_save = torch.save

def save(obj, path, *args, **kwargs):
    if "training_state" in str(path) and obj["step"] == 4:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the checkpoint write
        print("CHECKPOINTING", flush=True)
        time.sleep(300)
    return real_save(obj, path, *args, **kwargs)

torch.save = save
run_finetune(FinetuneOptions(output_dir=out, pretrained=folder, dataset="synthetic", synthetic_count=8,
                             resolution=32, epochs=2, batch_size=2, selora=SeLoRAConfig(interval=2, threshold=1.0),
                             seed=0, progress=False, max_steps=6))
"""


def start_child(folder, out, action, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # stderr to a file: a full pipe would block the child before it gets anywhere
    return subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(out), action], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)


def test_killed_writers_temp_folder_is_removed_a_live_ones_kept(tiny_folder, tmp_path):
    out = tmp_path / "run"
    child = start_child(tiny_folder, out, "kill", tmp_path / "child.log")
    child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, (tmp_path / "child.log").read_text()[-3000:]
    root = out / "checkpoints"
    dead = root / f".tmp-{STEP4}-{child.pid}"
    assert dead.is_dir()  # what the kill left behind
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        live = root / f".tmp-{STEP4}-{sleeper.pid}"
        live.mkdir()
        resumed = run_finetune(options(tiny_folder, out, max_steps=4, resume=str(out)))
        assert resumed.steps == 4
        assert not dead.exists() and live.is_dir()
        assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == [STEP2, STEP4]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_second_run_on_a_busy_output_folder_is_refused_naming_the_holder(tiny_folder, tmp_path):
    out = tmp_path / "run"
    child = start_child(tiny_folder, out, "hold", tmp_path / "child.log")
    try:
        line = child.stdout.readline()  # the child holds the folder, blocked in its step-4 checkpoint
        assert line.strip() == "CHECKPOINTING", (tmp_path / "child.log").read_text()[-3000:]
        rows = (out / "train_log.csv").read_text()
        for resume in (None, str(out)):
            with pytest.raises(RuntimeError, match=f"{out}.*pid {child.pid}"):
                run_finetune(options(tiny_folder, out, max_steps=6, resume=resume))
        assert (out / "train_log.csv").read_text() == rows  # nothing written, nothing moved aside
        assert not [p for p in out.iterdir() if p.name.startswith("previous-")]
    finally:
        child.kill()  # kill -9: the kernel drops its lock
        child.communicate()
    resumed = run_finetune(options(tiny_folder, out, max_steps=6, resume=str(out)))
    assert resumed.steps == 6
    with open(out / "train_log.csv") as handle:
        assert [line.split(",")[0] for line in handle.read().splitlines()[1:]] == ["2", "4", "6"]
