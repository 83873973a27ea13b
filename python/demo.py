"""The README's main job: a small end-to-end SeLoRA run on the embedded default, on a laptop CPU.

    python -m python.demo [--epochs 60] [--output-dir runs/demo]

Fine-tunes SeLoRA (lambda 1.1, t 40) and the LoRA r=4 baseline on the same deterministic synthetic
"chest X-ray" set (48 generated grayscale images with captions, 36 train / 12 validation) with a tiny
Stable Diffusion pipeline built from configs (random weights: nothing is downloaded), then generates the
validation prompts (50 steps, guidance 7.5, 3 seeds), scores FID-64/192/2048 and CLIP score and writes a
report (tables, rank heatmaps, curves, sample grid). Without --inception-weights / --clip-model the
metrics use randomly initialised stand-ins, so the numbers only show that the pipeline works.
"""
from __future__ import annotations

import sys

from selora_kernels.experiments.demo import DemoOptions, run_demo
from selora_kernels.experiments.finetune import rank_summary
from selora_kernels.experiments.options import options_parser, parse_options


def build_parser():
    return options_parser(DemoOptions, prog="python -m python.demo", description=__doc__.split("\n\n")[0])


def main(argv=None) -> int:
    report, ranks = run_demo(parse_options(DemoOptions, argv, build_parser()))
    if ranks is not None:
        print("SeLoRA ranks after training:\n" + rank_summary(ranks))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
