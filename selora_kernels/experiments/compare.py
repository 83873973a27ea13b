"""One command reproduces the comparison: fine-tune each method on the same data and seed, generate the test
prompts over several seeds, score FID-64/192/2048 + CLIP, write the report (the paper's Tables 1-3).

    run_comparison(CompareOptions(methods=("selora", "lora", "dylora", "adalora"), thresholds=(1.0, 1.1, 1.3)))

Fine-tuning goes through one function, `finetune_run(options, method, threshold, output_dir, total_steps)`,
which calls experiments.finetune.run_finetune; pass another `finetune_fn` to run_comparison to change it.
Evaluation images are the last split of the dataset (IU X-Ray: the 4 % test split; datasets with two splits:
the validation split), checked (unreadable files skipped or raised, as in training) and preprocessed like the
training images; generation samples at the same resolution (height = width = the training resolution).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from PIL import Image
from safetensors import safe_open

from ..config import SeLoRAConfig
from ..data.datasets import DATASETS, load_split_records
from ..data.records import check_images, to_rgb
from ..data.tiny_pipeline import TINY_RESOLUTION
from ..evaluation.generation import (PAPER_GUIDANCE, PAPER_STEPS, generate_for_seeds, load_pipeline_with_adapter,
                                     save_images)
from ..evaluation.metrics import (Evaluator, build_tiny_clip, evaluate_folders, resize_center_crop,
                                  write_random_inception_weights)
from ..evaluation.memory import RssMonitor
from ..evaluation.report import MethodRun, write_report
from ..integrations.adapter_io import PEFT_WEIGHT_NAME, atomic_write
from ..methods import METHODS
from ..training.trainer import total_steps as run_total_steps
from .finetune import FinetuneOptions, run_finetune
from .options import cli
from .presets import PAPER_PRESETS, apply_preset

KNOWN_METHODS = tuple(METHODS)


def comma_list(text) -> tuple:
    """"selora,lora" -> ("selora", "lora")."""
    if not isinstance(text, str):
        return tuple(text)
    return tuple(item.strip() for item in text.split(",") if item.strip())


@dataclass
class CompareOptions:
    preset: Optional[str] = field(default=None, metadata=cli(
        "one of the paper's comparisons (sets dataset, resolution, epochs, batch size, methods)",
        choices=tuple(PAPER_PRESETS)))
    output_dir: str = "runs/compare"
    methods: Sequence[str] = field(default=KNOWN_METHODS, metadata=cli(
        "comma-separated subset of " + ",".join(KNOWN_METHODS), type=comma_list))
    thresholds: Sequence[float] = field(default=(1.1,), metadata=cli(
        "SeLoRA lambdas, one run each (Table 3: 1.0 1.1 1.3)"))
    pretrained: Optional[str] = field(default=None, metadata=cli(
        "local diffusers folder (None: the tiny pipeline)"))
    dataset: str = field(default="synthetic", metadata=cli(choices=DATASETS))
    data_dir: Optional[str] = None
    synthetic_count: int = 24
    epochs: int = 1
    batch_size: int = 8
    resolution: Optional[int] = None
    lr: float = 1e-4
    interval: int = field(default=40, metadata=cli("SeLoRA t (also the log interval)"))
    seed: int = field(default=0, metadata=cli("training seed, the same for every method"))
    max_steps: Optional[int] = None
    eval_seeds: Sequence[int] = (0, 1, 2)
    num_inference_steps: int = field(default=PAPER_STEPS, metadata=cli("sampler steps", flag="--steps"))
    guidance_scale: float = field(default=PAPER_GUIDANCE, metadata=cli(flag="--guidance"))
    generation_batch_size: int = 8
    max_eval_prompts: Optional[int] = None
    inception_weights: Optional[str] = None
    clip_model: Optional[str] = None
    stand_in_eval_models: bool = field(default=False, metadata=cli(
        "random Inception + tiny CLIP (plumbing check only; the numbers mean nothing)"))
    inception_input_size: int = 299
    kid: bool = False
    device: str = "cpu"
    progress: bool = True
    on_bad_image: str = field(default="skip", metadata=cli(
        "unreadable images in training and evaluation data: report and skip, or stop", choices=("skip", "fail")))
    # more FinetuneOptions (or SeLoRAConfig) fields for every run
    extra_finetune: Dict[str, object] = field(default_factory=dict, metadata=cli(hidden=True))

    def __post_init__(self):
        if self.preset is not None:
            apply_preset(self, CompareOptions(), self.preset)
        unknown = [m for m in self.methods if m not in KNOWN_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"--methods: unknown {unknown}; choose from {KNOWN_METHODS}")
        if not self.eval_seeds:
            raise ValueError("--eval-seeds: need at least one seed")


DISPLAY_NAMES = {"selora": "SeLoRA", "lora": "LoRA (r=4)", "dylora": "DyLoRA (r<=4)", "adalora": "AdaLoRA (6->4)"}


def run_name(method: str, threshold: Optional[float]) -> str:
    """Folder name of a run."""
    return f"{method}_lambda{threshold:g}" if method == "selora" else method


def display_name(method: str, threshold: Optional[float]) -> str:
    return f"SeLoRA (lambda={threshold:g})" if method == "selora" else DISPLAY_NAMES[method]


def evaluation_split(options: CompareOptions):
    """(prompts, PIL images, train size) of the split used for evaluation: the same split as training
    (load_split_records), its records checked like the training data's (check_images, `on_bad_image`), images
    converted like the training images (16-bit scaled) and resized to the training resolution. Files are
    closed once read. The train size counts checked records: the trainer's steps are over those."""
    resolution = resolution_of(options)
    on_error = options.extra_finetune.get("on_bad_image", options.on_bad_image)
    splits = load_split_records(options.dataset, options.data_dir, seed=options.seed,
                                synthetic_count=options.synthetic_count, synthetic_size=resolution)
    records = check_images(splits[-1], on_error, progress=options.progress)
    if not records:
        raise ValueError(f"{options.dataset} evaluation split: no readable images (of {len(splits[-1])} records)")
    train_size = len(check_images(splits[0], on_error, progress=options.progress))
    prompts, images = [], []
    for record in records[:options.max_eval_prompts]:
        if isinstance(record.image, Image.Image):
            image = to_rgb(record.image)
        else:
            with Image.open(record.image) as handle:
                image = to_rgb(handle)  # a new image: nothing refers to the file once it is closed
        images.append(resize_center_crop(image, resolution))
        prompts.append(record.caption)
    return prompts, images, train_size


def resolution_of(options: CompareOptions) -> int:
    return options.resolution or (TINY_RESOLUTION if options.pretrained is None else 224)


def finetune_run(options: CompareOptions, method: str, threshold: Optional[float], output_dir: str,
                 total_steps: int):
    """Fine-tunes one method with experiments.finetune (same data, seed and schedule for every method).
    total_steps: the comparison's count, for a `finetune_fn` that needs it; run_finetune computes the same
    (and hands it to AdaLoRA's schedule)."""
    config_fields = {f.name for f in dataclasses.fields(SeLoRAConfig)}
    extra = {"on_bad_image": options.on_bad_image, **options.extra_finetune}
    selora = SeLoRAConfig(**{"threshold": threshold if threshold is not None else 1.1, "interval": options.interval,
                             **{k: v for k, v in extra.items() if k in config_fields}})
    finetune_options = FinetuneOptions(
        output_dir=output_dir, pretrained=options.pretrained, dataset=options.dataset, data_dir=options.data_dir,
        synthetic_count=options.synthetic_count, epochs=options.epochs, batch_size=options.batch_size,
        resolution=options.resolution, lr=options.lr, method=method, selora=selora, seed=options.seed,
        max_steps=options.max_steps, progress=options.progress,
        **{k: v for k, v in extra.items() if k not in config_fields})
    return run_finetune(finetune_options)


def exported_adapter(run_dir: str) -> str:
    """The adapter folder to generate with: the best-validation export, else the final one."""
    for candidate in (os.path.join(run_dir, "best"), os.path.join(run_dir, "peft_lora")):
        if os.path.isfile(os.path.join(candidate, PEFT_WEIGHT_NAME)):
            return candidate
    raise FileNotFoundError(f"{run_dir}: no {PEFT_WEIGHT_NAME} under best/ or peft_lora/ (did fine-tuning export?)")


def adapter_parameter_report(adapter_dir: str, pipe) -> Dict[str, Dict[str, float]]:
    """Adapter parameters at the end of training (live ranks) per part, and % of that part's parameters."""
    counts = {"unet": 0, "text_encoder": 0}
    with safe_open(os.path.join(adapter_dir, PEFT_WEIGHT_NAME), framework="pt") as handle:
        for key in handle.keys():
            part = key.split(".", 1)[0]
            if part in counts:
                counts[part] += int(math.prod(handle.get_slice(key).get_shape()))
    report = {}
    for part, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        # the pipeline has the adapter loaded: count only the frozen base
        base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        report[part] = {"trainable": counts[part], "base": base, "percent": 100.0 * counts[part] / base}
    total_base = sum(r["base"] for r in report.values())
    total = sum(counts.values())
    report["total"] = {"trainable": total, "base": total_base, "percent": 100.0 * total / total_base}
    return report


def build_evaluator(options: CompareOptions) -> Evaluator:
    inception_weights, clip_model = options.inception_weights, options.clip_model
    if options.stand_in_eval_models:
        standins = Path(options.output_dir) / "stand_in_eval_models"
        inception_weights = write_random_inception_weights(str(standins / "inception_random.pth"))
        clip_model = build_tiny_clip(str(standins / "tiny_clip"))
    return Evaluator.from_paths(inception_weights, clip_model, kid=options.kid,
                                inception_input_size=options.inception_input_size, device=options.device,
                                progress=options.progress)


def write_jsonl_atomic(path: Path, rows: Sequence[dict]) -> None:
    """Writes `rows` as JSON lines to `path` whole (atomic_write)."""
    text = "".join(json.dumps(row, default=str) + "\n" for row in rows)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def training_images(options: CompareOptions):
    """PIL images of the training split at the training resolution (the real-vs-real reference row)."""
    splits = load_split_records(options.dataset, options.data_dir, seed=options.seed,
                                synthetic_count=options.synthetic_count, synthetic_size=resolution_of(options))
    images = []
    for record in check_images(splits[0], options.on_bad_image, progress=False):
        if isinstance(record.image, Image.Image):
            image = to_rgb(record.image)
        else:
            with Image.open(record.image) as handle:
                image = to_rgb(handle)
        images.append(resize_center_crop(image, resolution_of(options)))
    return images


def run_comparison(options: CompareOptions, finetune_fn: Optional[Callable] = None, evaluator=None,
                   base_row: Optional[Dict[str, object]] = None, extra_notes: Sequence[str] = ()) -> Path:
    """Fine-tunes, generates, evaluates every method; returns the report.md path.

    evaluator: anything with Evaluator's set_real / evaluate / clip (default: build_evaluator(options)).
    base_row: {"name", "peak_memory_mb", "training_time_s"} adds the base pipeline without an adapter (same
    prompts and seeds) and a real-vs-real reference (training split against the evaluation split) to the
    report. On a machine without CUDA each fine-tuning run's peak memory is the process RSS, sampled."""
    finetune_fn = finetune_fn or finetune_run
    output = Path(options.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if evaluator is None:
        evaluator = build_evaluator(options)  # before training: missing weights fail in seconds, not hours
    prompts, real_images, train_size = evaluation_split(options)
    real_dir = save_images(real_images, prompts, str(output / "real"))
    evaluator.set_real(real_images)
    total_steps = run_total_steps(options.epochs, train_size, options.batch_size, options.max_steps)
    resolution = resolution_of(options)  # the training (and real-image) resolution: generate at it too
    per_seed_rows: List[dict] = []
    plan = [(m, t) for m in options.methods for t in (options.thresholds if m == "selora" else (None,))]
    runs: List[MethodRun] = []
    generation = dict(num_inference_steps=options.num_inference_steps, guidance_scale=options.guidance_scale,
                      batch_size=options.generation_batch_size, height=resolution, width=resolution,
                      progress=options.progress)
    if base_row is not None:
        pipe = load_pipeline_with_adapter(options.pretrained, None, device=options.device, seed=options.seed)
        folders = generate_for_seeds(pipe, prompts, options.eval_seeds, str(output / "generated" / "base"),
                                     **generation)
        evaluation = evaluate_folders(evaluator, folders, real_dir)
        runs.append(MethodRun(name=str(base_row["name"]), method="base", metrics=evaluation["summary"],
                              samples_dir=folders[0], peak_memory_mb=base_row.get("peak_memory_mb"),
                              training_time_s=base_row.get("training_time_s"), memory_kind="rss"))
        per_seed_rows.append({"run": "base", **evaluation})
        evaluator.set_real(real_images)
        reference = evaluator.evaluate(training_images(options), prompts=None) if evaluator.clip is None else {}
        if reference:
            runs.append(MethodRun(name=f"real (training split, {train_size} images)", method="real",
                                  metrics={k: {"mean": v, "std": 0.0, "n": 1} for k, v in reference.items()}))
    for method, threshold in plan:
        name = run_name(method, threshold)
        run_dir = str(output / "runs" / name)
        monitor = None if torch.cuda.is_available() else RssMonitor(Path(run_dir) / "train_log.csv")
        with monitor or contextlib.nullcontext():
            finetune_fn(options, method, threshold, run_dir, total_steps)
        adapter = exported_adapter(run_dir)
        pretrained = options.pretrained or os.path.join(run_dir, "tiny_pipeline")
        pipe = load_pipeline_with_adapter(pretrained, adapter, device=options.device, seed=options.seed)
        folders = generate_for_seeds(pipe, prompts, options.eval_seeds, str(output / "generated" / name),
                                     **generation)
        evaluation = evaluate_folders(evaluator, folders, real_dir)
        ranks_file = os.path.join(run_dir, "final_ranks.json")
        ranks = json.loads(Path(ranks_file).read_text()) if os.path.isfile(ranks_file) else None
        log = os.path.join(run_dir, "train_log.csv")
        runs.append(MethodRun(name=display_name(method, threshold), method=method, metrics=evaluation["summary"],
                              parameters=adapter_parameter_report(adapter, pipe),
                              train_log=log if os.path.isfile(log) else None, ranks=ranks or None,
                              samples_dir=folders[0], threshold=threshold,
                              peak_memory_mb=monitor.peak_mb if monitor else None,
                              memory_kind="rss" if monitor else None,
                              memory_curve=monitor.curve if monitor else None))
        per_seed_rows.append({"run": name, **evaluation})
        write_jsonl_atomic(output / "per_seed.json", per_seed_rows)  # one line per run, this invocation's only
    notes = [f"{len(prompts)} evaluation prompts, seeds {list(options.eval_seeds)}, "
             f"{options.num_inference_steps} sampler steps, guidance {options.guidance_scale}; "
             f"{total_steps} training steps per method, seed {options.seed}."]
    if options.stand_in_eval_models:
        notes.append("Evaluation used RANDOMLY INITIALISED Inception and CLIP stand-ins (--stand-in-eval-models): "
                     "the FID/CLIP numbers test the plumbing only and mean nothing.")
    notes.extend(extra_notes)
    (output / "compare_options.json").write_text(json.dumps(asdict(options), indent=2, default=str))
    return write_report(runs, output / "report", real_dir=real_dir, notes=notes)
