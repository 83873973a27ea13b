"""The README's main job: a small end-to-end SeLoRA run on the embedded default, on a laptop CPU.

    python -m python.demo [--epochs 60] [--output-dir runs/demo] [--base-cache runs/base_cache]

Pre-trains a tiny Stable Diffusion pipeline on a generic synthetic domain (once; cached by recipe hash, nothing
downloaded), fine-tunes SeLoRA (lambda 1.1, t 40) and the LoRA r=4 baseline from it on the same deterministic
synthetic "chest X-ray" set (48 grayscale phantoms with captions, 36 train / 12 validation), generates the
validation prompts with the base and each method (50 steps, guidance 2, 3 seeds) and writes a report (table
with mean and spread over seeds, sample grid base / methods / real, rank heatmaps, curves, peak memory).
Scores: distances in the base VAE's feature space; plus FID and CLIP score with --inception-weights and
--clip-model (local weights).
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
