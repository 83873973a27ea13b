"""Toy demo: SeLoRA adapters on a small MLP learn a low-rank teacher and grow where Fisher says so.

    python -m python.demo_toy [--steps 300] [--threshold 1.1] [--interval 20]

Each adapted layer's teacher differs from the frozen base by an update of a different rank (1, 4, 8), so
the rank each layer ends up at is visible in the printout.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from selora_kernels import SeLoRAAdamW, SeLoRALinear, expand_modules

TEACHER_RANKS = (1, 4, 8)


def build_models(width: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    base = [nn.Linear(width, width) for _ in TEACHER_RANKS]
    teacher = nn.Sequential()
    for layer, rank in zip(base, TEACHER_RANKS):
        t = nn.Linear(width, width)
        delta = torch.randn(width, rank, generator=gen) @ torch.randn(rank, width, generator=gen) / width
        t.load_state_dict({"weight": layer.weight.detach() + delta, "bias": layer.bias.detach()})
        teacher.extend([t, nn.Tanh()])
    student = nn.Sequential()
    for i, layer in enumerate(base):
        student.extend([SeLoRALinear.from_linear(layer, name=f"layer{i}"), nn.Tanh()])
    return teacher.requires_grad_(False), student


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--interval", type=int, default=20, help="t: steps between expansion tests")
    parser.add_argument("--threshold", type=float, default=1.1, help="lambda: expand when FI-Ratio >= it")
    parser.add_argument("--max-rank", type=int, default=12)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    teacher, student = build_models(args.width, args.seed)
    adapters = [m for m in student if isinstance(m, SeLoRALinear)]
    optimizer = SeLoRAAdamW([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    for step in range(1, args.steps + 1):
        x = torch.randn(32, 8, args.width)
        measuring = step % args.interval == 0
        if measuring:
            for m in adapters:
                m.start_measuring()
        loss = nn.functional.mse_loss(student(x), teacher(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if measuring:
            scores = [m.fisher_scores() for m in adapters]
            grow = [m for m, s in zip(adapters, scores) if s.ratio >= args.threshold and m.rank < args.max_rank]
            for m in adapters:
                m.stop_measuring()
            expand_modules(grow, optimizer=optimizer)
            ratios = " ".join(f"{s.ratio:.3f}" for s in scores)
            ranks = " ".join(str(m.rank) for m in adapters)
            print(f"step {step:4d}  loss {loss.item():.5f}  FI-ratios {ratios}  ranks {ranks}")
    print("final ranks:", {m.selora_name: m.rank for m in adapters},
          "(teacher update ranks:", dict(zip([m.selora_name for m in adapters], TEACHER_RANKS)), ")")


if __name__ == "__main__":
    main()
