"""Reproduce the comparison in one command: fine-tune SeLoRA (per lambda), LoRA, DyLoRA and AdaLoRA on the same
data and seed, generate the evaluation prompts over 3 seeds, score FID-64/192/2048 + CLIP, write the report.
Argument parsing only; the work is in selora_kernels.experiments.compare.

    python -m python.compare --stand-in-eval-models --max-steps 8 --steps 5     # tiny smoke run, CPU
    python -m python.compare --pretrained /models/sd15 --dataset iu_xray --data-dir /data/iu --epochs 10 \
        --thresholds 1.0 1.1 1.3 --inception-weights /w/weights-inception-2015-12-05-6726825d.pth \
        --clip-model /w/clip-vit-large-patch14 --device cuda
"""
from __future__ import annotations

import sys

from selora_kernels.experiments.compare import CompareOptions, run_comparison
from selora_kernels.experiments.options import options_parser, parse_options, report_user_errors


def build_parser():
    return options_parser(CompareOptions, prog="python -m python.compare", description=__doc__.split("\n\n")[0])


def main(argv=None) -> int:
    options = parse_options(CompareOptions, argv, build_parser())
    return report_user_errors(lambda: compare(options))  # MissingWeightsError is a FileNotFoundError


def compare(options: CompareOptions) -> int:
    print(run_comparison(options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
