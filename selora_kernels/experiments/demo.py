"""The README's main job: SeLoRA (lambda 1.1, t 40) and the LoRA r=4 baseline fine-tuned on the embedded
synthetic X-ray phantoms from a tiny base pipeline that was pre-trained on a generic synthetic domain (built
once, cached by recipe hash: data/base_pipeline.py), evaluated against the base without an adapter and the
real phantoms, and reported (run_comparison with the demo's settings).

Scores: with both --inception-weights and --clip-model, FID/CLIP plus the base-VAE feature distances; without
them only the feature distances (evaluation/features.py), never randomly initialised stand-ins.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..data.base_pipeline import (BaseRecipe, cached_base_folder, ensure_base_pipeline, is_complete,
                                  load_base_pipeline)
from ..data.tiny_pipeline import TINY_RESOLUTION
from ..evaluation.features import VaeFeatureEvaluator, combined_evaluator
from .compare import CompareOptions, build_evaluator, comma_list, run_comparison, run_name
from .options import cli

DEMO_THRESHOLD = 1.1
DEMO_IMAGES = 48  # 36 train / 12 validation
# LoRA-style adaptation of a pre-trained model in a few hundred CPU steps: 1e-4 (the paper's rate over
# thousands of GPU steps) barely moved the base's samples in the demo's budget
DEMO_LR = 1e-3
# fine-tuning never sees the empty prompt, so the unconditional branch stays the generic base: at 7.5 the
# guidance extrapolated into saturated colour blobs, and 2 gave half the feature distance of 3 (same adapters)
DEMO_GUIDANCE = 2.0


@dataclass
class DemoOptions:
    output_dir: str = "runs/demo"
    epochs: int = field(default=150, metadata=cli("5 steps an epoch on the synthetic set"))
    lr: float = DEMO_LR
    guidance: float = field(default=DEMO_GUIDANCE, metadata=cli("classifier-free guidance scale (paper: 7.5)"))
    methods: Sequence[str] = field(default=("lora", "selora"), metadata=cli("comma-separated", type=comma_list))
    base_cache: str = field(default="runs/base_cache", metadata=cli(
        "folder of pre-trained tiny base pipelines, one per recipe hash (built when missing)"))
    inception_weights: Optional[str] = field(default=None, metadata=cli("local FID Inception weights (.pth)"))
    clip_model: Optional[str] = field(default=None, metadata=cli("local CLIP model folder"))
    progress: bool = True


def run_demo(options: DemoOptions, recipe: BaseRecipe = BaseRecipe()) -> Tuple[Path, Optional[Dict[str, int]]]:
    """(report.md path, SeLoRA's final ranks or None when SeLoRA did not run)."""
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        # the tiny pipeline's tensors are too small to share: on 2 busy cores, sampling the base with 2 threads
        # took minutes instead of seconds (fine-tuning already runs on 1, finetune.cpu_threads)
        torch.set_num_threads(1)
    try:
        return _run_demo(options, recipe)
    finally:
        torch.set_num_threads(threads)


def _run_demo(options: DemoOptions, recipe: BaseRecipe) -> Tuple[Path, Optional[Dict[str, int]]]:
    cached = is_complete(cached_base_folder(options.base_cache, recipe))
    base, meta = ensure_base_pipeline(options.base_cache, recipe, progress=options.progress)
    stats = meta["stats"]
    compare = CompareOptions(
        output_dir=options.output_dir, methods=tuple(options.methods), thresholds=(DEMO_THRESHOLD,),
        pretrained=str(base), resolution=TINY_RESOLUTION, synthetic_count=DEMO_IMAGES, epochs=options.epochs,
        lr=options.lr, guidance_scale=options.guidance, inception_weights=options.inception_weights, clip_model=options.clip_model,
        progress=options.progress, extra_finetune={"threads": 1})  # tiny tensors: 1 thread is fastest (finetune.py)
    features = VaeFeatureEvaluator(load_base_pipeline(base).vae, TINY_RESOLUTION)
    real_metrics = options.inception_weights is not None and options.clip_model is not None
    evaluator = combined_evaluator(build_evaluator(compare), features) if real_metrics else features
    notes = [f"Base: the tiny pipeline pre-trained on the generic synthetic domain (shapes, textures, gradients; "
             f"no phantoms), recipe hash {meta['hash']}, {recipe.vae_steps} VAE + {recipe.unet_steps} UNet/text "
             f"encoder steps; built in {stats['seconds']:.0f} s, peak RSS {stats['peak_rss_mb']:.0f} MiB "
             f"({'loaded from the cache' if cached else 'built by this run'}: {base}). Its table row "
             f"shows the pre-training's time and memory.",
             f"Fine-tuning: lr {options.lr:g}, batch 8, {options.epochs} epochs of the 36 training phantoms."]
    if not real_metrics:
        notes.append("No --inception-weights/--clip-model: FID and CLIP score are not computed (random stand-ins "
                     "would measure nothing); the scores are distances in the base-VAE feature space.")
    report = run_comparison(compare, evaluator=evaluator, extra_notes=notes,
                            base_row={"name": "base (pre-trained, no adapter)", "peak_memory_mb": stats["peak_rss_mb"],
                                      "training_time_s": stats["seconds"]})
    ranks_file = Path(options.output_dir) / "runs" / run_name("selora", DEMO_THRESHOLD) / "final_ranks.json"
    return report, json.loads(ranks_file.read_text()) if ranks_file.is_file() else None
