"""The fine-tuning program as a function: pipeline + data + method + trainer + report files.

`python -m python.finetune` only parses arguments into FinetuneOptions (experiments.options) and calls
`run_finetune`. The model family (families/) comes from --family or, by default, from the pipeline folder's
model_index.json; it decides the trained modules, the conditioning, the objective and the export layout.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import MODE_ALIASES, TARGET_PRESETS, TRIAL_MODES, SeLoRAConfig, canonical_mode
from ..data.datasets import DATASETS, build_datasets
from ..data.tiny_pipeline import TINY_RESOLUTION, load_pipeline
from ..evaluation.heatmaps import plot_rank_heatmaps
from ..families import AUTO, FAMILIES, ModelFamily, get_family
from ..integrations.kohya_export import KOHYA_FAMILIES, export_kohya, kohya_family
from ..methods import METHODS, make_method
from ..training.trainer import (BASE_STORAGE_DTYPES, Trainer, TrainOptions, TrainResult, check_memory_options,
                                total_steps)
from .options import cli

logger = logging.getLogger(__name__)
EXPORT_FORMATS = ("peft", "kohya")


def target_modules_arg(values):
    """--targets as SeLoRAConfig wants it: a single preset name stays a string, anything else is a list of
    patterns."""
    if isinstance(values, str):
        return values
    values = list(values)
    if len(values) == 1 and canonical_mode(values[0]) in TARGET_PRESETS:
        return values[0]
    return values


SELORA_FLAGS = {  # the SeLoRAConfig fields the fine-tuning command line sets
    "threshold": cli("lambda of the FI-Ratio test"),
    "interval": cli("t: steps between expansion tests (also the log interval unless --log-every)"),
    "max_rank": cli("largest rank an adapter grows to (None: no limit)"),
    "trial": cli("expansion rule (reference_code: the old name of released_script)",
                 choices=TRIAL_MODES + tuple(MODE_ALIASES)),
    "target_modules": cli("preset (released_script, all_linear) or module name patterns", flag="--targets",
                          type=str, nargs="+", convert=target_modules_arg),
    "exclude_modules": cli("module name patterns never adapted (every method)", type=str, nargs="+"),
}


@dataclass
class FinetuneOptions:
    output_dir: str = "runs/selora"
    pretrained: Optional[str] = field(default=None, metadata=cli(
        "local diffusers pipeline folder (None: a tiny pipeline of --family built from configs)"))
    family: str = field(default=AUTO, metadata=cli(
        "model family (auto: from the folder's model_index.json; tiny pipeline: sd1); outside SD 1.x/2.x the "
        "default --targets (released_script) becomes the family's preset", choices=(AUTO,) + tuple(FAMILIES)))
    dataset: str = field(default="synthetic", metadata=cli(choices=DATASETS))
    data_dir: Optional[str] = None
    caption_column: str = field(default="text", metadata=cli("caption column (--dataset folder)"))
    on_bad_image: str = field(default="skip", metadata=cli("missing/corrupt images: report and skip, or stop",
                                                           choices=("skip", "fail")))
    synthetic_count: int = 48
    epochs: int = 150  # the default run: 36 synthetic training images, 5 steps per epoch, 750 steps
    batch_size: int = 8
    resolution: Optional[int] = field(default=None, metadata=cli("None: 64 (tiny pipeline), 224 otherwise"))
    lr: float = 1e-4
    method: str = field(default="selora", metadata=cli(choices=sorted(METHODS)))
    # targets and the expansion test; the baselines take their target_modules / exclude_modules from it
    selora: SeLoRAConfig = field(default_factory=SeLoRAConfig, metadata=cli(nested=SELORA_FLAGS))
    log_every: Optional[int] = field(default=None, metadata=cli(
        "steps between log rows and checkpoints (None: the SeLoRA interval t)"))
    mixed_precision: str = field(default="no", metadata=cli(choices=("no", "bf16", "fp16")))
    gradient_checkpointing: bool = field(default=False, metadata=cli(
        "recompute the denoiser's (and an adapted text encoder's) activations in the backward (the models' own "
        "switch, as diffusers' scripts): less activation memory for one more forward per step; SeLoRA's Fisher "
        "scores and decisions are the same"))
    base_storage_dtype: str = field(default="same", metadata=cli(
        "frozen base weights: same (as loaded); bf16/fp16 (denoiser and text encoders; needs the same "
        "--mixed-precision); float8_e4m3fn/float8_e5m2 (the denoiser's linear/conv layers stored in fp8, computed "
        "in the --mixed-precision dtype, bf16 or fp16; the rest in it). Adapters and optimizer state stay fp32",
        choices=BASE_STORAGE_DTYPES))
    seed: int = 0
    resume: Optional[str] = field(default=None, metadata=cli("a checkpoint folder or a previous --output-dir"))
    max_steps: Optional[int] = None
    progress: bool = True
    threads: Optional[int] = field(default=None, metadata=cli(
        "torch CPU threads (None: 1 for the tiny pipeline on CPU, else torch's choice)"))
    export_format: str = field(default="peft", metadata=cli(
        "peft: the peft/diffusers export (peft_lora/); kohya: also kohya/<output folder name>.safetensors, the "
        f"kohya-ss / ComfyUI / A1111 layout (families {', '.join(KOHYA_FAMILIES)})", choices=EXPORT_FORMATS))

    def __post_init__(self):
        # checked here, not where they fail (a ZeroDivisionError in the step count, a PIL error in a resize):
        # parse_options reports a ValueError as a usage error naming the flag
        for name, low, optional in (("epochs", 1, False), ("batch_size", 1, False), ("synthetic_count", 1, False),
                                    ("max_steps", 1, True), ("log_every", 1, True), ("threads", 1, True),
                                    ("resolution", 8, True)):
            value = getattr(self, name)
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{option_flag(name)} must be an integer >= {low}, got {value!r}")
        if self.resolution is not None and self.resolution % 8:
            # the VAE works on 8x8 patches: Stable Diffusion pipelines take only multiples of 8
            raise ValueError(f"{option_flag('resolution')} must be a multiple of 8 (e.g. 64, 224, 512), got "
                             f"{self.resolution}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < float("inf"):
            raise ValueError(f"{option_flag('lr')} must be a finite number > 0, got {self.lr!r}")
        if self.dataset != "synthetic" and self.data_dir is None:
            raise ValueError(f"--dataset {self.dataset} needs --data-dir (the folder holding its files)")
        check_memory_options(self.mixed_precision, self.base_storage_dtype)
        if self.export_format == "kohya" and self.family != AUTO:
            kohya_family(FAMILIES[self.family])  # ValueError naming the family, reported as a usage error


def option_flag(name: str) -> str:
    """The command-line flag of a FinetuneOptions field, as errors name it."""
    return "--" + name.replace("_", "-")


def cpu_threads(options: FinetuneOptions) -> Optional[int]:
    """The tiny pipeline's tensors are too small to share between threads: on 2 busy cores, 2 OpenMP threads
    made a step 8x slower than 1 (measured). Real pipelines keep torch's default."""
    if options.threads:
        return options.threads
    if options.pretrained is None and not torch.cuda.is_available():
        return 1
    return None


def load_family_pipeline(options: FinetuneOptions, output: Path):
    """(family, pipeline): --pretrained loaded as its family's pipeline, or that family's tiny pipeline (cached
    under the output folder). Stable Diffusion keeps load_pipeline's path and cache folder."""
    family = get_family(options.family, options.pretrained)
    if family.name in ("sd1", "sd2") and (options.pretrained is not None or family.name == "sd1"):
        return family, load_pipeline(options.pretrained, cache_dir=output / "tiny_pipeline"
                                     if options.pretrained is None else None, seed=options.seed)
    if options.pretrained is not None:
        return family, family.load(options.pretrained)
    cache = output / f"tiny_{family.name}"
    if (cache / "model_index.json").exists():
        return family, family.load(cache)
    return family, family.build_tiny(cache, seed=options.seed)


def family_config(family: ModelFamily, config: SeLoRAConfig) -> SeLoRAConfig:
    """`config`, with the family's default targets where it keeps the SD preset outside Stable Diffusion."""
    if family.name in ("sd1", "sd2") or config.target_modules != SeLoRAConfig().target_modules:
        return config
    config = copy.deepcopy(config)
    targets = family.default_targets
    config.target_modules = targets if isinstance(targets, str) else list(targets)
    return config


def kohya_file_stem(output: Path) -> str:
    """The kohya file's name: the output folder's (tools list LoRAs by file name)."""
    return output.resolve().name or "selora"


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
    if options.export_format == "kohya":  # an auto-detected family: checked before training, not after it
        kohya_family(get_family(options.family, options.pretrained))
    output.mkdir(parents=True, exist_ok=True)
    family, pipe = load_family_pipeline(options, output)
    resolution = options.resolution or (TINY_RESOLUTION if options.pretrained is None else 224)
    train_set, validation_set = build_datasets(
        options.dataset, family.tokenizer(pipe), resolution, data_dir=options.data_dir,
        caption_column=options.caption_column, on_error=options.on_bad_image, seed=options.seed,
        synthetic_count=options.synthetic_count, synthetic_size=resolution)
    logger.info("train %d images, validation %d images, resolution %d", len(train_set), len(validation_set),
                resolution)
    selora = family_config(family, options.selora)
    method = make_method(options.method, selora, seed=options.seed,
                         total_steps=total_steps(options.epochs, len(train_set), options.batch_size,
                                                 options.max_steps), parts=family.method_parts)
    logger.info("model family %s (%s); targets %s", family.name, family.objective, selora.target_modules)
    trainer = Trainer(pipe, method, train_set, validation_set, family=family, options=TrainOptions(
        output_dir=str(output), epochs=options.epochs, batch_size=options.batch_size, lr=options.lr,
        seed=options.seed, mixed_precision=options.mixed_precision, max_steps=options.max_steps,
        log_every=options.log_every or options.selora.interval, resume=options.resume, progress=options.progress,
        gradient_checkpointing=options.gradient_checkpointing, base_storage_dtype=options.base_storage_dtype))
    result = trainer.train()
    ranks = result.ranks
    if not trainer.accelerator.is_main_process:
        return result  # every process holds the same adapters (all-reduced decisions): one writer
    (output / "final_ranks.json").write_text(json.dumps(ranks, indent=2))
    method.save(output / "adapter.safetensors", extra_metadata={"step": result.steps})
    peft_path = family.export(method, output / "peft_lora")
    if options.export_format == "kohya":
        # SeLoRA's own modules give B in float64 (one rounding); other methods convert their peft export
        source = method.components if method.name == "selora" else peft_path
        export_kohya(source, output / "kohya" / f"{kohya_file_stem(output)}.safetensors", family,
                     unet_config=family.denoiser(pipe).config)
    plot_rank_heatmaps(ranks, output / "rank_heatmap.png",
                       title=f"SeLoRA ranks after {result.steps} steps (lambda={selora.threshold}, "
                             f"t={selora.interval}, {selora.trial})")
    return result
