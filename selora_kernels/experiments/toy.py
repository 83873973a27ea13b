"""Toy run: SeLoRA adapters on a small MLP learn a low-rank teacher and grow where Fisher says so.

Each adapted layer's teacher differs from the frozen base by an update of a different rank (1, 4, 8), so the
rank each layer ends up at shows whether growth follows the information in the gradients.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..expansion.growth import expand_modules
from ..nn.selora_linear import SeLoRALinear
from ..optim.selora_adamw import SeLoRAAdamW
from .options import cli

TEACHER_RANKS = (1, 4, 8)


@dataclass
class ToyOptions:
    steps: int = 300
    interval: int = field(default=20, metadata=cli("t: steps between expansion tests"))
    threshold: float = field(default=1.1, metadata=cli("lambda: expand when FI-Ratio >= it"))
    max_rank: int = 12
    width: int = 32
    seed: int = 0


def build_models(width: int, seed: int):
    """(teacher, student): the student's SeLoRA layers share the frozen base the teacher perturbs."""
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


def run_toy(options: ToyOptions, report: Optional[Callable[[dict], None]] = None) -> Dict[str, int]:
    """Trains the student; after each expansion test calls `report` with the step, loss, FI-ratios and ranks.
    Returns the final rank of each layer."""
    torch.manual_seed(options.seed)
    teacher, student = build_models(options.width, options.seed)
    adapters: List[SeLoRALinear] = [m for m in student if isinstance(m, SeLoRALinear)]
    optimizer = SeLoRAAdamW([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    for step in range(1, options.steps + 1):
        x = torch.randn(32, 8, options.width)
        measuring = step % options.interval == 0
        if measuring:
            for m in adapters:
                m.start_measuring()
        loss = nn.functional.mse_loss(student(x), teacher(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if measuring:
            scores = [m.fisher_scores() for m in adapters]
            grow = [m for m, s in zip(adapters, scores) if s.ratio >= options.threshold and m.rank < options.max_rank]
            for m in adapters:
                m.stop_measuring()
            expand_modules(grow, optimizer=optimizer)
            if report is not None:
                report({"step": step, "loss": loss.item(), "ratios": [s.ratio for s in scores],
                        "ranks": [m.rank for m in adapters]})
    return {m.selora_name: m.rank for m in adapters}
