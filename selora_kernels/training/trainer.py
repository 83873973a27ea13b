"""The fine-tuning loop: a diffusion pipeline of any supported model family with a pluggable adapter method.

Per step: the family (families/) turns the batch into the denoiser's input, conditioning and target, drawing
every random number from a generator seeded by seed_mix(seed, step) (so a resumed run draws exactly what the
original would): for Stable Diffusion 1.x, VAE latents (frozen), noise and timesteps uniform in
0..num_train_timesteps-1, text encoder + UNet forward (both adapted), MSE to the noise. Then backward,
optimizer step, the method's hook (SeLoRA: the expansion test every t steps). Validation each epoch keeps
the best adapter. Every `log_every` steps a log row goes to CSV and TensorBoard; every `checkpoint_every`
steps an atomic checkpoint (adapter, optimizer, step, method state; see checkpoints.py) is written, so a
crash loses at most the steps since the last one.

Memory options (TrainOptions): `gradient_checkpointing` recomputes the adapted parts' activations in the
backward (the denoiser's own enable_gradient_checkpointing, as diffusers' training scripts do; SeLoRA's
Fisher is the same with or without it); `base_storage_dtype` holds the frozen base weights in bf16/fp16
(diffusers' scripts' weight_dtype) or the denoiser's layers in fp8 (diffusers' enable_layerwise_casting),
the adapters and their optimizer state staying fp32 (as the scripts' cast_training_params).
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

# --base-storage-dtype: the dtype the frozen base weights are held in ("same": as the pipeline was loaded)
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP8_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
BASE_STORAGE_DTYPES = ("same",) + tuple(HALF_DTYPES) + tuple(FP8_DTYPES)
CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def check_memory_options(mixed_precision: str, base_storage_dtype: str) -> None:
    """Raises ValueError for a base storage dtype the run cannot compute with: a half-precision base needs
    autocast in that dtype (SeLoRALinear computes in the autocast dtype, or else wants the input in the base
    weight's dtype), fp8 needs bf16 or fp16 autocast (its compute dtype)."""
    if base_storage_dtype not in BASE_STORAGE_DTYPES:
        raise ValueError(f"base_storage_dtype must be one of {BASE_STORAGE_DTYPES}, got {base_storage_dtype!r}")
    if base_storage_dtype in HALF_DTYPES and mixed_precision != base_storage_dtype:
        raise ValueError(f"--base-storage-dtype {base_storage_dtype} needs --mixed-precision {base_storage_dtype} "
                         f"(the base is computed in its own dtype), got --mixed-precision {mixed_precision}")
    if base_storage_dtype in FP8_DTYPES and mixed_precision not in HALF_DTYPES:
        raise ValueError(f"--base-storage-dtype {base_storage_dtype} stores the denoiser's weights in fp8 and "
                         f"computes in the --mixed-precision dtype: use --mixed-precision bf16 (or fp16), got "
                         f"{mixed_precision}")


def cast_frozen_base(module: torch.nn.Module, dtype: torch.dtype, base_tensors) -> None:
    """Casts, in place, the floating parameters and buffers of `module` whose ids are in `base_tensors` (what
    the model held before the adapters were injected) to `dtype`. Adapter parameters and buffers (SeLoRA's
    A, B and trial row) keep their dtype: module.to(dtype) followed by diffusers' cast_training_params would
    round the adapters' initial values through `dtype`."""
    for owner in module.modules():
        for name, param in owner.named_parameters(recurse=False):
            if id(param) in base_tensors and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)  # the same Parameter object: hooks and references hold
        for name, buffer in owner.named_buffers(recurse=False):
            if id(buffer) in base_tensors and buffer.is_floating_point() and buffer.dtype != dtype:
                owner._buffers[name] = buffer.to(dtype)


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    """Gradient checkpointing through the model's own switch: diffusers models' enable_gradient_checkpointing
    (non-reentrant torch.utils.checkpoint), transformers text encoders' with use_reentrant=False: a reentrant
    checkpoint whose inputs need no gradient (frozen embeddings) would give the adapters inside none."""
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
        return
    kwargs = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x name of the switch
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"--gradient-checkpointing: {type(module).__name__} has no gradient checkpointing switch")


def store_layers_in_fp8(denoiser: torch.nn.Module, storage_dtype: torch.dtype, compute_dtype: torch.dtype,
                        checkpointing: bool) -> None:
    """The denoiser's frozen linear/conv layers stored in `storage_dtype`, cast to `compute_dtype` around each
    forward: diffusers' ModelMixin.enable_layerwise_casting, with its skip patterns (norms, patch and position
    embeddings, proj_in/out, the model's own list) and peft's adapter layers skipped."""
    if not hasattr(denoiser, "enable_layerwise_casting"):
        raise ValueError(f"fp8 base storage: the denoiser {type(denoiser).__name__} is not a diffusers model "
                         f"(no enable_layerwise_casting)")
    # diffusers hooks nn.Linear/Conv/Embedding leaves only: SeLoRA's base_layer is one, while its A, B and trial
    # row are tensors of the SeLoRALinear around it and stay fp32. SeLoRALinear reads base_layer.weight itself
    # (no hook runs) and casts it to the autocast dtype, so the run needs autocast (check_memory_options).
    # A convolution saves its weight Parameter itself, and torch's non-reentrant recompute keeps a tensor that
    # needs no gradient by reference: diffusers' hook has put the fp8 data back by the time the backward reads
    # it (CheckpointError). Under gradient checkpointing the convolutions stay in the compute dtype.
    denoiser.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=compute_dtype,
                                      skip_modules_classes=CONVOLUTIONS if checkpointing else None)


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
    gradient_checkpointing: bool = False  # recompute the adapted parts' activations in the backward
    # frozen base weights: "same" (as loaded), "bf16"/"fp16" (all but the VAE), fp8 (the denoiser's layers)
    base_storage_dtype: str = "same"

    def __post_init__(self):
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mixed_precision not in ("no", "fp32", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no/fp32, bf16 or fp16, got {self.mixed_precision!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        check_memory_options(self.mixed_precision, self.base_storage_dtype)


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
        # what the adapted parts hold before the adapters go in: the frozen base that base_storage_dtype casts
        base_tensors = {id(t) for module in parts.values() for t in (*module.parameters(), *module.buffers())}
        method.inject(parts)
        self._apply_memory_options(pipe, method, parts, base_tensors)
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

    def _apply_memory_options(self, pipe, method, parts, base_tensors) -> None:
        """base_storage_dtype and gradient_checkpointing, on the injected model before accelerate wraps it."""
        options = self.options
        if options.base_storage_dtype != "same":
            # bf16/fp16 base: that dtype; fp8: the compute dtype, then the denoiser's layers stored in fp8
            dtype = HALF_DTYPES.get(options.base_storage_dtype) or HALF_DTYPES[options.mixed_precision]
            for module in parts.values():
                cast_frozen_base(module, dtype, base_tensors)
            for module in self.frozen:
                # the VAE, small next to the denoiser and text encoders, keeps the pipeline's dtype: latents as
                # exact as without the option (diffusers' SDXL script keeps its VAE in fp32 too)
                if module is not getattr(pipe, "vae", None):
                    module.to(dtype)
            for param in method.trainable_parameters():  # fp32 adapters, even on a pipeline loaded in half
                if param.dtype != torch.float32:
                    param.data = param.data.float()
            if options.base_storage_dtype in FP8_DTYPES:
                store_layers_in_fp8(parts[DENOISER_PART], FP8_DTYPES[options.base_storage_dtype], dtype,
                                    options.gradient_checkpointing)
                if not options.gradient_checkpointing:
                    logger.warning("--base-storage-dtype %s without --gradient-checkpointing: the backward keeps "
                                   "the %s copy every layer computed with, so the peak memory is not below a "
                                   "%s base; add --gradient-checkpointing", options.base_storage_dtype,
                                   options.mixed_precision, options.mixed_precision)
        if options.gradient_checkpointing:
            for part, module in parts.items():
                if part in method.parts:  # an unadapted part has nothing to recompute for
                    enable_gradient_checkpointing(module)

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
