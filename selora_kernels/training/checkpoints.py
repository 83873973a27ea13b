"""Checkpoints of a fine-tuning run: written atomically, found again for --resume, checked against the run
that resumes them.

A checkpoint is a folder `<output>/checkpoints/step-XXXXXXX/` holding the method's adapter file and
training_state.pt (step, epoch, best validation loss, optimizer state, method state and description, the
options). It is written in a temp folder and renamed into place; then `checkpoints/latest.json` is pointed at
it (atomic_write), so a crash at any moment leaves the previous checkpoint whole and found. The last file
written into a checkpoint is manifest.json (size and sha256 of every other file): a resume verifies it, and
falls back to the newest checkpoint that verifies when the latest is damaged.

A run holds an flock on `<output>/.lock` (lock_output_dir), so two runs never share an output folder; the
kernel drops the lock when the process exits or is killed. Temp folders of writers that died mid-checkpoint
are removed at the next start (remove_stale_temp_files).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import safe_open

from ..config import canonical_mode
from ..integrations.adapter_io import atomic_write
from ..methods.base import AdapterMethod

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "selora_checkpoint_manifest"
LOCK_FILE = ".lock"
# what a run writes into its output folder (the tiny pipeline cache is shared and stays)
RUN_OUTPUTS = (CHECKPOINT_DIR, "best", "tensorboard", "train_log.csv", "validation.csv", "expansions.csv",
               ADAPTER_FILE, "peft_lora", "kohya", "final_ranks.json", "rank_heatmap.png")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files do not match its manifest (or cannot be read); `problems` names each file."""

    def __init__(self, folder: Path, problems: List[str]):
        self.folder, self.problems = Path(folder), problems
        super().__init__(f"damaged checkpoint {folder}: " + "; ".join(problems))


class OutputFolderBusy(RuntimeError):
    """Another live process holds the output folder's lock."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    # a rename is only as durable as the data it names: flush files (and folders) before relying on them
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def write_manifest(folder: Path, step: int) -> Path:
    """manifest.json: size and sha256 of every file of the checkpoint folder, written last."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST_FILE:
            _fsync(path)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = folder / MANIFEST_FILE
    with open(manifest, "w") as handle:
        json.dump({"format": MANIFEST_FORMAT, "version": 1, "step": step, "files": files}, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    return manifest


def verify_checkpoint(folder) -> None:
    """Raises DamagedCheckpoint naming each file that is missing, of the wrong size or checksum, or (in a
    checkpoint written before manifests existed) unreadable."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    problems = []
    if not manifest_path.is_file():
        # written before manifests existed: nothing to compare against, but the files must at least parse
        for name in (ADAPTER_FILE, STATE_FILE):
            path = folder / name
            if not path.is_file():
                problems.append(f"{path} is missing")
                continue
            try:
                if name == ADAPTER_FILE:
                    with safe_open(str(path), framework="pt") as handle:
                        for key in handle.keys():
                            handle.get_tensor(key)
                else:
                    torch.load(path, map_location="cpu", weights_only=False)
            except Exception as error:  # any parse failure of a file is damage, reported with its name
                problems.append(f"{path} cannot be read ({type(error).__name__}: {error})")
        if problems:
            raise DamagedCheckpoint(folder, problems)
        return
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not a checkpoint manifest")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DamagedCheckpoint(folder, [f"{manifest_path} cannot be read ({error})"]) from None
    for name in (ADAPTER_FILE, STATE_FILE):
        if name not in files:
            problems.append(f"{folder / name} is not listed in {manifest_path}")
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != expected.get("bytes"):
            problems.append(f"{path} has {path.stat().st_size} bytes, the manifest says {expected.get('bytes')}")
        elif _sha256(path) != expected.get("sha256"):
            problems.append(f"{path} does not match its sha256 in the manifest (changed or corrupted)")
    if problems:
        raise DamagedCheckpoint(folder, problems)


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-")[1])
    except (IndexError, ValueError):
        return -1


def _is_checkpoint_folder(path: Path) -> bool:
    # not the adapter file: an output folder holds one too (the final adapter)
    return any((path / name).is_file() for name in (STATE_FILE, MANIFEST_FILE))


def resolve_checkpoint(path) -> Path:
    """The checkpoint a --resume PATH continues from, verified (verify_checkpoint).

    PATH a checkpoint folder: that one, or DamagedCheckpoint. PATH an output folder: the checkpoint latest.json
    names, then the others newest first; the first that verifies wins. Skipping damaged ones logs ONE warning
    naming their files; when none verifies, DamagedCheckpoint names the files of every one."""
    path = Path(path)
    if _is_checkpoint_folder(path):
        verify_checkpoint(path)
        return path
    root = path / CHECKPOINT_DIR
    latest_path = root / LATEST
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name)),
                        key=_step_of, reverse=True) if root.is_dir() else []
    problems = []
    if latest_path.is_file():
        try:
            latest = root / json.loads(latest_path.read_text())["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            problems.append(f"{latest_path} cannot be read ({error})")
        else:
            candidates = [latest] + [p for p in candidates if p.name != latest.name]
    if not candidates:
        raise FileNotFoundError(f"--resume {path}: neither a checkpoint folder (with {STATE_FILE}) nor an output "
                                f"folder with {CHECKPOINT_DIR}/step-*" + (f" ({problems[0]})" if problems else ""))
    for folder in candidates:
        try:
            verify_checkpoint(folder)
        except DamagedCheckpoint as damaged:
            problems.extend(damaged.problems)
            continue
        if problems:
            logger.warning("--resume %s: %s; resuming from the newest complete checkpoint, %s", path,
                           "; ".join(problems), folder)
        return folder
    raise DamagedCheckpoint(root, problems + [f"no checkpoint in {root} verifies, nothing to resume from"])


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temp_files(output_dir: Path) -> List[Path]:
    """Removes what a checkpoint writer killed mid-write left in checkpoints/: `.tmp-step-*-<pid>` folders and
    `.<file>.<pid>.tmp` files of processes that are gone (those of live processes stay). A `.old-step-*-<pid>`
    folder (a re-saved step moved aside) goes back into place if the new one never arrived, else it is
    removed. Call it holding the output folder's lock. Returns the paths removed."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        match = (re.fullmatch(r"\.(tmp|old)-(step-\d+)-(\d+)", path.name)
                 or re.fullmatch(r"\.(.+)\.(\d+)\.tmp", path.name))
        if match is None:
            continue
        pid = int(match.groups()[-1])
        # the lock is held by this process: its own leftovers are from an earlier run that failed in it
        if pid != os.getpid() and pid_alive(pid):
            continue
        if path.name.startswith(".old-") and not (root / match.group(2)).exists():
            os.replace(path, root / match.group(2))  # latest.json may name this step: put it back
            logger.warning("restored %s from %s (a re-save of that step was interrupted)", root / match.group(2),
                           path)
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        logger.info("removed %d temp file(s) of interrupted checkpoint writes in %s", len(removed), root)
    return removed


# folder -> [open lock file, holders in this process]: a process may run several Trainers one after another on
# one folder (an earlier one kept alive by a traceback must not lock the next one out)
_HELD: Dict[str, list] = {}


def lock_output_dir(output_dir) -> str:
    """Takes an exclusive flock on `<output>/.lock` (held until unlock_output_dir, or the process ends, even
    by kill -9) and writes this pid into it. Another live process holding it: OutputFolderBusy naming the folder
    and that pid. Returns the key for unlock_output_dir."""
    import fcntl  # POSIX only: imported where the lock is taken

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    key = str(output_dir.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    handle = open(output_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            # a file system without flock (some network mounts): run, but say the folder is unguarded
            logger.warning("cannot lock %s (%s): nothing stops another run from using %s at the same time",
                           output_dir / LOCK_FILE, error, output_dir)
            handle.close()
            _HELD[key] = [None, 1]
            return key
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise OutputFolderBusy(f"output folder {output_dir} is in use by another run (pid {holder} holds "
                               f"{output_dir / LOCK_FILE}); wait for it to finish or use another "
                               f"--output-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _HELD[key] = [handle, 1]
    return key


def unlock_output_dir(key: Optional[str]) -> None:
    held = _HELD.get(key) if key is not None else None
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[key]
        if held[0] is not None:
            held[0].close()  # closing the file drops the flock


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
    """Writes checkpoints/step-XXXXXXX atomically (temp folder + rename; manifest.json with the files'
    checksums written last), points latest.json at it, and keeps the newest `keep` checkpoints. optimizer: the
    torch optimizer (not a wrapper); options: the run's options as a dict (a resume checks some of them)."""
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
    write_manifest(tmp, step)  # last: a folder with a manifest was written whole
    _fsync(tmp)
    replaced = None
    if final.exists():  # the same step saved again (end of training, resume): the new one wins
        replaced = root / f".old-{name}-{os.getpid()}"
        os.replace(final, replaced)
    os.replace(tmp, final)
    _fsync(root)
    atomic_write(root / LATEST, lambda path: path.write_text(json.dumps({"checkpoint": name, "step": step},
                                                                        indent=2)))
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    older = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                   and int(p.name.split("-")[1]) < step)
    for stale in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, method: AdapterMethod, options, verify: bool = True) -> dict:
    """Checks that the checkpoint in `folder` is whole (its manifest; verify=False: already done by
    resolve_checkpoint) and was written by this method with these settings (the method's description,
    batch_size and seed), loads its adapter into `method` and returns the training state."""
    folder = Path(folder)
    if verify:
        verify_checkpoint(folder)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    saved, current = state["method"], method.describe()
    if canonical_mode(saved.get("method")) != current.get("method"):
        # before the other settings: another method differs in many of them, the method is the reason
        raise ValueError(f"--resume {folder}: the checkpoint was written by method {saved.get('method')!r}, "
                         f"this run uses method {current.get('method')!r}; resume with --method "
                         f"{saved.get('method')} or start a fresh run")
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
