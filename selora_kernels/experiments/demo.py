"""The README's main job: SeLoRA (lambda 1.1, t 40) and the LoRA r=4 baseline on the embedded synthetic X-ray
set with the tiny pipeline, evaluated and reported (run_comparison with the demo's settings).

Without both --inception-weights and --clip-model the metrics run on randomly initialised stand-ins, so the
numbers only show that the pipeline works.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from .compare import CompareOptions, comma_list, run_comparison, run_name
from .options import cli

DEMO_THRESHOLD = 1.1
DEMO_IMAGES = 48  # 36 train / 12 validation


@dataclass
class DemoOptions:
    output_dir: str = "runs/demo"
    epochs: int = field(default=60, metadata=cli("5 steps an epoch on the synthetic set"))
    methods: Sequence[str] = field(default=("selora", "lora"), metadata=cli("comma-separated", type=comma_list))
    inception_weights: Optional[str] = field(default=None, metadata=cli("local FID Inception weights (.pth)"))
    clip_model: Optional[str] = field(default=None, metadata=cli("local CLIP model folder"))
    progress: bool = True


def run_demo(options: DemoOptions) -> Tuple[Path, Optional[Dict[str, int]]]:
    """(report.md path, SeLoRA's final ranks or None when SeLoRA did not run)."""
    real_metrics = options.inception_weights is not None and options.clip_model is not None
    report = run_comparison(CompareOptions(
        output_dir=options.output_dir, methods=tuple(options.methods), thresholds=(DEMO_THRESHOLD,),
        synthetic_count=DEMO_IMAGES, epochs=options.epochs, inception_weights=options.inception_weights,
        clip_model=options.clip_model, stand_in_eval_models=not real_metrics, progress=options.progress))
    ranks_file = Path(options.output_dir) / "runs" / run_name("selora", DEMO_THRESHOLD) / "final_ranks.json"
    return report, json.loads(ranks_file.read_text()) if ranks_file.is_file() else None
