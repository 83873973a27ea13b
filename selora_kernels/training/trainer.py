"""The fine-tuning loop: a diffusion pipeline of any supported model family with a pluggable adapter method.

Per step: the family (families/) turns the batch into the denoiser's input, conditioning and target, drawing
every random number from a generator seeded by seed_mix(seed, step) (so a resumed run draws exactly what the
original would): for Stable Diffusion 1.x, VAE latents (frozen), noise and timesteps uniform in
0..num_train_timesteps-1, text encoder + UNet forward (both adapted), MSE to the noise. Then backward,
optimizer step, the method's hook (SeLoRA: the expansion test every t steps). Validation each epoch keeps
the best adapter. Every `log_every` steps a log row goes to CSV and TensorBoard; every `checkpoint_every`
steps an atomic checkpoint (adapter, optimizer, step, method state; see checkpoints.py) is written, so a
crash loses at most the steps since the last one.
"""
from __future__ import annotations

import csv
import logging
import math
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from ..data.seeds import seed_mix
from ..families import DENOISER_PART, TEXT_PART, ModelFamily, StepInputs, detect_family
from ..methods.base import AdapterMethod
from ..optim.state_growth import unwrap_optimizer
from .checkpoints import (ADAPTER_FILE, CHECKPOINT_DIR, checkpoint_name, load_checkpoint, lock_output_dir,
                          move_previous_run_aside, remove_stale_temp_files, resolve_checkpoint,
                          restore_training_state, save_checkpoint, unlock_output_dir)

logger = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    output_dir: str
    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-4
    seed: int = 0
    mixed_precision: str = "no"  # "no" (fp32), "bf16", "fp16" (GPU, with a GradScaler)
    max_steps: Optional[int] = None
    log_every: int = 40
    checkpoint_every: Optional[int] = None  # steps; None: at every log row
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # a checkpoint folder, or an output folder (its latest checkpoint)
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mixed_precision not in ("no", "fp32", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no/fp32, bf16 or fp16, got {self.mixed_precision!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


@dataclass
class TrainResult:
    steps: int
    best_validation_loss: float
    ranks: Dict[str, int]
    output_dir: Path
    history: List[dict] = field(default_factory=list)


def total_steps(epochs: int, train_size: int, batch_size: int, max_steps: Optional[int] = None) -> int:
    """Optimizer steps of a run: epochs x ceil(train_size / batch_size), capped by max_steps."""
    steps = epochs * math.ceil(train_size / batch_size)
    return min(steps, max_steps) if max_steps is not None else steps


class Trainer:
    def __init__(self, pipe, method: AdapterMethod, train_dataset, validation_dataset, options: TrainOptions,
                 family: Optional[ModelFamily] = None):
        # accelerate / diffusers: imported when a trainer is built, not by everything that imports training/
        from accelerate import Accelerator

        self.options = options
        self.output_dir = Path(options.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        precision = "no" if options.mixed_precision == "fp32" else options.mixed_precision
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        self._lock_finalizer = None
        try:
            self._take_output_folder()
            self._setup(pipe, method, train_dataset, validation_dataset, family)
        except BaseException:
            self.close()
            raise

    def _setup(self, pipe, method, train_dataset, validation_dataset, family) -> None:
        options = self.options
        self.pipe, self.method = pipe, method
        self.family = family if family is not None else detect_family(pipe)
        self.noise_scheduler = self.family.noise_scheduler(pipe)
        self.vae = pipe.vae
        # method part -> module: "unet" is the denoiser (a UNet or a transformer), "text_encoder" only where the
        # family runs it inside the step
        parts = self.family.adapted_parts(pipe)
        self.frozen = self.family.frozen_modules(pipe)
        for module in self.frozen:
            module.requires_grad_(False)
        self.train_dataset, self.validation_dataset = train_dataset, validation_dataset
        method.inject(parts)
        if not options.resume:
            self._move_previous_run_aside()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # the log's peak memory is this run's, not the process's
        self.resume_state = None
        if options.resume:
            # the main process verifies (and warns once); the others load what it chose
            folder = Path(self._on_main(lambda: str(resolve_checkpoint(options.resume))))
            self.resume_state = load_checkpoint(folder, method, options, verify=False)
        self.optimizer = method.make_optimizer(options.lr)
        device = self.accelerator.device
        for module in self.frozen:
            module.to(device)
        *prepared, self.optimizer = self.accelerator.prepare(*parts.values(), self.optimizer)
        self.models = dict(zip(parts, prepared))
        self.unet, self.text_encoder = self.models[DENOISER_PART], self.models.get(TEXT_PART)
        method.attach(self.optimizer, grad_scaler=self.accelerator.scaler)
        self.step, self.best_validation = 0, math.inf
        if self.resume_state is not None:
            restore_training_state(self.resume_state, self._optimizer(), method)
            self.step = int(self.resume_state["step"])
            self.best_validation = float(self.resume_state["best_validation"])
        self.steps_per_epoch = math.ceil(len(train_dataset) / options.batch_size)
        self.log_path = self.output_dir / "train_log.csv"
        self.writer = None
        if options.tensorboard and self.accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard: only when its log is wanted

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))

    # ------------------------------------------------------------------ output folder
    def _on_main(self, work):
        """work() on the main process; its result (or its error, raised on every process, so none waits
        forever at the next barrier) on all of them."""
        result, error = None, None
        if self.accelerator.is_main_process:
            try:
                result = work()
            except Exception as caught:
                error = caught
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list  # only multi-process runs need it

            shared = broadcast_object_list([result, None if error is None else f"{type(error).__name__}: {error}"])
            if error is None and shared[1] is not None:
                raise RuntimeError(f"the main process failed: {shared[1]}")
            result = shared[0]
        if error is not None:
            raise error
        return result

    def _take_output_folder(self) -> None:
        """One run per output folder (the main process holds <output>/.lock until close() or its exit, a crash
        included); then the temp files of checkpoint writes that were killed go."""
        def take():
            key = lock_output_dir(self.output_dir)
            # also released when a trainer that was never closed is collected
            self._lock_finalizer = weakref.finalize(self, unlock_output_dir, key)
            remove_stale_temp_files(self.output_dir)

        self._on_main(take)

    def close(self) -> None:
        """Releases the output folder (idempotent; a process that ends releases it anyway)."""
        if self._lock_finalizer is not None:
            self._lock_finalizer()  # calls unlock_output_dir once
        self._lock_finalizer = None

    def _move_previous_run_aside(self) -> None:
        if self.accelerator.is_main_process:
            move_previous_run_aside(self.output_dir)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ one step
    def _prepare_batch(self, batch, step: int, per_process: bool = True) -> StepInputs:
        """The family's denoiser input, conditioning and target of a batch, drawn from the (seed, step)
        generator."""
        # one noise stream per (step, process): under multi-process training each process gets its own
        # shard of the batch (see _shard) and its own noise; a single process keeps the (seed, step) stream
        world, rank = (self.accelerator.num_processes, self.accelerator.process_index) if per_process else (1, 0)
        gen = torch.Generator().manual_seed(seed_mix(self.options.seed, step * world + rank))
        return self.family.prepare(self.pipe, self.noise_scheduler, batch, gen, self.accelerator.device)

    def _loss(self, inputs: StepInputs, with_extra: bool = True) -> torch.Tensor:
        with self.accelerator.autocast():
            prediction = self.family.predict(self.models, inputs)
        loss = self.family.loss(prediction, inputs)
        extra = self.method.extra_loss() if with_extra else None
        return loss + extra if extra is not None else loss

    def _shard(self, batch):
        """This process's share of a global batch (rows rank, rank + world, ...): the global batch size and
        the steps per epoch stay those of a single process, whatever the number of processes."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if world == 1:
            return batch
        rows = len(batch["input_ids"])
        if rows < world:
            raise ValueError(f"a batch of {rows} cannot be shared by {world} processes: raise --batch-size")
        return {key: value[rank::world] for key, value in batch.items()}

    def train_step(self, batch) -> float:
        batch = self._shard(batch)
        step = self.step
        for model in self.models.values():
            model.train()
        self.method.before_forward(step)
        inputs = self._prepare_batch(batch, step)
        loss = self._loss(inputs)
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        events = self.method.after_step(step, closure=lambda: self._loss(inputs, with_extra=False))
        self._log_events(events)
        self.step += 1
        return float(loss.detach())

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over the validation set with fixed noise/timesteps (comparable across epochs)."""
        for model in self.models.values():
            model.eval()
        total, count = 0.0, 0
        loader = torch.utils.data.DataLoader(self.validation_dataset, batch_size=self.options.batch_size)
        for index, batch in enumerate(loader):
            inputs = self._prepare_batch(batch, -1 - index, per_process=False)
            loss = self._loss(inputs, with_extra=False)
            total += float(loss) * len(inputs)
            count += len(inputs)
        return total / max(count, 1)

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        """Runs to the end. A failure releases the output folder; after a success it stays held (the caller
        writes its reports there) until close(), the trainer is collected or the process ends."""
        try:
            return self._train()
        except BaseException:
            self.close()
            raise

    def _train(self) -> TrainResult:
        options = self.options
        run_steps = total_steps(options.epochs, len(self.train_dataset), options.batch_size, options.max_steps)
        self._trim_logs(self.step)
        bar = tqdm(total=run_steps, initial=min(self.step, run_steps), desc="fine-tune",
                   disable=not (options.progress and self.accelerator.is_main_process), dynamic_ncols=True)
        window_loss, window_time, window_steps = 0.0, 0.0, 0
        validation_rows, loss = [], math.nan
        checkpoint_after_validation = False
        start_epoch = self.step // self.steps_per_epoch
        for epoch in range(start_epoch, options.epochs):
            if self.step >= run_steps:
                break
            loader = torch.utils.data.DataLoader(self.train_dataset, batch_size=options.batch_size, shuffle=True,
                                                 generator=torch.Generator().manual_seed(options.seed + epoch))
            skip = self.step - epoch * self.steps_per_epoch  # batches this epoch already trained (resume)
            for index, batch in enumerate(loader):
                if index < skip:
                    continue
                if self.step >= run_steps:
                    break
                began = time.perf_counter()
                loss = self.train_step(batch)
                window_time += time.perf_counter() - began
                window_loss += loss
                window_steps += 1
                bar.update(1)
                if self.step % options.log_every == 0:
                    self._log_row(epoch, window_loss / window_steps, window_time / window_steps)
                    window_loss, window_time, window_steps = 0.0, 0.0, 0
                if self.step % (options.checkpoint_every or options.log_every) == 0:
                    if self.step == (epoch + 1) * self.steps_per_epoch or self.step >= run_steps:
                        checkpoint_after_validation = True  # so the checkpoint holds this epoch's best
                    else:
                        self.save_checkpoint(epoch)
            if self.step == (epoch + 1) * self.steps_per_epoch or self.step >= run_steps:
                validation = self.validate()
                improved = validation < self.best_validation
                if improved:
                    self.best_validation = validation
                    self._save_best(epoch, validation)
                validation_rows.append({"epoch": epoch, "step": self.step, "validation_loss": validation,
                                        "best": improved})
                if self.accelerator.is_main_process:
                    self._append_csv(self.output_dir / "validation.csv", validation_rows[-1])
                if self.writer:
                    self.writer.add_scalar("validation/loss", validation, self.step)
                bar.set_postfix(loss=f"{loss:.4f}", rank=sum(self.method.ranks().values()),
                                val=f"{validation:.4f}", best=f"{self.best_validation:.4f}")
                if checkpoint_after_validation:
                    self.save_checkpoint(epoch)
                    checkpoint_after_validation = False
        bar.close()
        if window_steps:
            self._log_row(self.step // self.steps_per_epoch, window_loss / window_steps, window_time / window_steps)
        self.save_checkpoint(self.step // max(self.steps_per_epoch, 1))
        if self.writer:
            self.writer.close()
        return TrainResult(self.step, self.best_validation, self.method.ranks(), self.output_dir, validation_rows)

    # ------------------------------------------------------------------ logs
    def _log_row(self, epoch: int, loss: float, step_time: float) -> None:
        if not self.accelerator.is_main_process:
            return
        ranks = self.method.ranks()
        memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        row = {"step": self.step, "epoch": epoch, "loss": round(loss, 6), "total_rank": sum(ranks.values()),
               "step_time_s": round(step_time, 4), "peak_gpu_mem_mb": round(memory, 1)}
        row.update({f"rank:{name}": rank for name, rank in ranks.items()})
        self._append_csv(self.log_path, row)
        if self.writer:
            for key in ("loss", "total_rank", "step_time_s", "peak_gpu_mem_mb"):
                self.writer.add_scalar(f"train/{key}", row[key], self.step)
            for name, rank in ranks.items():
                self.writer.add_scalar(f"rank/{name}", rank, self.step)

    def _log_events(self, events) -> None:
        if not self.accelerator.is_main_process:
            return  # every process takes the same decisions (Fisher is all-reduced): log them once
        for event in events:
            self._append_csv(self.output_dir / "expansions.csv",
                             event._asdict() if hasattr(event, "_asdict") else dict(event))

    @staticmethod
    def _append_csv(path: Path, row: dict) -> None:
        exists = path.is_file()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if not exists:
                writer.writeheader()
            writer.writerow(row)

    def _trim_logs(self, step: int) -> None:
        """On resume, drop log rows written after the checkpoint (the crashed run's lost steps)."""
        for name in ("train_log.csv", "validation.csv", "expansions.csv"):
            path = self.output_dir / name
            if not path.is_file():
                continue
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle))
            if not rows:
                continue
            kept = [r for r in rows if int(r["step"]) < step or (name != "expansions.csv" and int(r["step"]) == step)]
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(kept)

    # ------------------------------------------------------------------ checkpoints
    def _optimizer(self):
        return unwrap_optimizer(self.optimizer)  # accelerate wraps the torch optimizer

    def save_checkpoint(self, epoch: int) -> Path:
        """Writes checkpoints/step-XXXXXXX (checkpoints.save_checkpoint) from the main process."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            # processes hold identical adapters and optimizer state: one writer
            return self.output_dir / CHECKPOINT_DIR / checkpoint_name(self.step)
        return save_checkpoint(self.output_dir, self.step, epoch, self.method, self._optimizer(),
                               self.best_validation, asdict(self.options), self.options.keep_checkpoints)

    def _save_best(self, epoch: int, validation: float) -> None:
        if not self.accelerator.is_main_process:
            return
        best = self.output_dir / "best"
        self.method.save(best / ADAPTER_FILE, extra_metadata={"step": self.step, "epoch": epoch,
                                                              "validation_loss": validation})
        self.family.export(self.method, best)
