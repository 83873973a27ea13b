"""The fine-tuning program as a function: pipeline + data + method + trainer + report files.

`python -m python.finetune` only parses arguments into FinetuneOptions and calls `run_finetune`.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from ..config import SeLoRAConfig
from .data import build_datasets
from .heatmaps import plot_rank_heatmaps
from .methods import METHODS
from .tiny_pipeline import TINY_RESOLUTION, load_pipeline
from .trainer import Trainer, TrainOptions, TrainResult

logger = logging.getLogger(__name__)


@dataclass
class FinetuneOptions:
    output_dir: str = "runs/selora"
    pretrained: Optional[str] = None  # a local diffusers folder; None: the tiny pipeline built from configs
    dataset: str = "synthetic"
    data_dir: Optional[str] = None
    caption_column: str = "text"
    on_bad_image: str = "skip"
    synthetic_count: int = 48
    epochs: int = 150  # the default run: 36 synthetic training images, 5 steps per epoch, 750 steps
    batch_size: int = 8
    resolution: Optional[int] = None  # None: 64 for the tiny pipeline, 224 otherwise
    lr: float = 1e-4
    method: str = "selora"
    threshold: float = 1.1
    interval: int = 40
    max_rank: Optional[int] = None
    trial: str = "same_backward"
    targets: List[str] = field(default_factory=lambda: ["reference_code"])
    mixed_precision: str = "no"
    seed: int = 0
    resume: Optional[str] = None
    max_steps: Optional[int] = None
    progress: bool = True
    threads: Optional[int] = None  # torch CPU threads; None: 1 for the tiny pipeline on CPU, else torch's


def cpu_threads(options: FinetuneOptions) -> Optional[int]:
    """The tiny pipeline's tensors are too small to share between threads: on 2 busy cores, 2 OpenMP threads
    made a step 8x slower than 1 (measured). Real pipelines keep torch's default."""
    if options.threads:
        return options.threads
    if options.pretrained is None and not torch.cuda.is_available():
        return 1
    return None


def selora_config(options: FinetuneOptions) -> SeLoRAConfig:
    targets = options.targets
    target_modules = targets[0] if len(targets) == 1 and targets[0] in ("reference_code", "all_linear") else targets
    return SeLoRAConfig(threshold=options.threshold, interval=options.interval, max_rank=options.max_rank,
                        trial=options.trial, target_modules=target_modules)


def total_steps(options: FinetuneOptions, train_size: int) -> int:
    steps = options.epochs * math.ceil(train_size / options.batch_size)
    return min(steps, options.max_steps) if options.max_steps else steps


def make_method(options: FinetuneOptions, steps: Optional[int] = None):
    if options.method not in METHODS:
        raise ValueError(f"--method {options.method!r} is not available; choose one of {sorted(METHODS)}")
    return METHODS[options.method](selora_config(options), seed=options.seed, total_steps=steps)


def rank_summary(ranks) -> str:
    """A few lines: total, histogram of ranks, the largest modules."""
    total = sum(ranks.values())
    histogram = {}
    for rank in ranks.values():
        histogram[rank] = histogram.get(rank, 0) + 1
    top = sorted(ranks.items(), key=lambda item: -item[1])[:5]
    lines = [f"{len(ranks)} adapted layers, total rank {total} (started at {len(ranks)})",
             "rank histogram: " + ", ".join(f"r={r}: {n}" for r, n in sorted(histogram.items())),
             "largest: " + ", ".join(f"{name}={rank}" for name, rank in top)]
    return "\n".join(lines)


def run_finetune(options: FinetuneOptions) -> TrainResult:
    threads = cpu_threads(options)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(options.seed)
    output = Path(options.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(options.pretrained, cache_dir=output / "tiny_pipeline" if options.pretrained is None
                         else None, seed=options.seed)
    resolution = options.resolution or (TINY_RESOLUTION if options.pretrained is None else 224)
    train_set, validation_set = build_datasets(
        options.dataset, pipe.tokenizer, resolution, data_dir=options.data_dir,
        caption_column=options.caption_column, on_error=options.on_bad_image, seed=options.seed,
        synthetic_count=options.synthetic_count, synthetic_size=resolution)
    logger.info("train %d images, validation %d images, resolution %d", len(train_set), len(validation_set),
                resolution)
    method = make_method(options, total_steps(options, len(train_set)))
    trainer = Trainer(pipe, method, train_set, validation_set, TrainOptions(
        output_dir=str(output), epochs=options.epochs, batch_size=options.batch_size, lr=options.lr,
        seed=options.seed, mixed_precision=options.mixed_precision, max_steps=options.max_steps,
        log_every=options.interval, resume=options.resume, progress=options.progress))
    result = trainer.train()
    ranks = result.ranks
    if not trainer.accelerator.is_main_process:
        return result  # every process holds the same adapters (all-reduced decisions): one writer
    (output / "final_ranks.json").write_text(json.dumps(ranks, indent=2))
    method.save(output / "adapter.safetensors", extra_metadata={"step": result.steps})
    method.export(output / "peft_lora")
    plot_rank_heatmaps(ranks, output / "rank_heatmap.png",
                       title=f"SeLoRA ranks after {result.steps} steps (lambda={options.threshold}, "
                             f"t={options.interval}, {options.trial})")
    return result
