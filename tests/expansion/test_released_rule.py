"""The released script's rule: a module with no gradient at either pass has FI-Ratio 0/0 = nan and never
expands, whatever lambda (the released script computes nan too)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selora_kernels import ExpansionController, SeLoRAAdamW, SeLoRAConfig, inject_selora


class DeadBranch(nn.Module):
    """`dead`'s output is multiplied by zero: its adapter gets exactly zero gradient."""

    def __init__(self):
        super().__init__()
        self.live, self.dead = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.live(x) + 0.0 * self.dead(x)


@pytest.mark.parametrize("trial", ["released_script", "reference_code", "same_backward"])
def test_zero_gradient_module_never_expands(trial):
    torch.manual_seed(0)
    model = DeadBranch()
    inject_selora(model, SeLoRAConfig(target_modules="all_linear"), prefix="m")
    optimizer = SeLoRAAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = ExpansionController(model, optimizer, SeLoRAConfig(trial=trial, threshold=1.0, interval=1))
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    for step in range(3):
        controller.before_forward(step)
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        decisions = controller.after_step(step, closure=lambda: F.mse_loss(model(x), y))
        dead = [d for d in decisions if d.module.endswith("dead")]
        assert dead and all(math.isnan(d.ratio) and not d.expanded for d in dead), dead
    assert model.dead.rank == 1
    if trial == "same_backward":
        assert model.live.rank > 1  # the ratio is >= 1 there: the live branch grows at lambda = 1
