"""Toy demo: SeLoRA adapters on a small MLP learn a low-rank teacher and grow where Fisher says so.

    python -m python.demo_toy [--steps 300] [--threshold 1.1] [--interval 20]

Each adapted layer's teacher differs from the frozen base by an update of a different rank (1, 4, 8), so
the rank each layer ends up at is visible in the printout. The work is in selora_kernels.experiments.toy.
"""
from __future__ import annotations

import sys

from selora_kernels.experiments.options import options_parser, parse_options
from selora_kernels.experiments.toy import TEACHER_RANKS, ToyOptions, run_toy


def build_parser():
    return options_parser(ToyOptions, prog="python -m python.demo_toy", description=__doc__.split("\n\n")[0])


def print_row(row: dict) -> None:
    ratios = " ".join(f"{ratio:.3f}" for ratio in row["ratios"])
    ranks = " ".join(str(rank) for rank in row["ranks"])
    print(f"step {row['step']:4d}  loss {row['loss']:.5f}  FI-ratios {ratios}  ranks {ranks}")


def main(argv=None) -> int:
    ranks = run_toy(parse_options(ToyOptions, argv, build_parser()), report=print_row)
    print("final ranks:", ranks, "(teacher update ranks:", dict(zip(ranks, TEACHER_RANKS)), ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
