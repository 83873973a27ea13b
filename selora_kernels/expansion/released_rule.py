"""The released script's expansion test (`trial="released_script"`), kept apart from the controller as peft
keeps its `RankAllocator` apart from `AdaLoraModel`.

"Fisher" here is the squared norm of the batch-mean gradient of a module's live slots:

- first pass, at theta_t: `measure`, an optimizer pre-step hook, reads the gradients of the step;
- second pass, at theta_{t+1} after optimizer.step(): `ratios` makes each module's trial slot live (row K of
  A, zero B column; K is zero until the module's first expansion), runs a second forward/backward through a
  closure that recomputes the loss on the same batch, noise and timesteps, and restores everything.

FI-Ratio = second / first. On expansion the controller adopts a fresh Kaiming row (`draw_trial_rows`), not
the row it measured with, and resets the module's whole optimizer state, as the released script does.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, List, Optional, Sequence, Set

import torch

from ..config import next_capacity
from ..fisher_stats import fi_ratio
from ..nn.selora_linear import SeLoRALinear
from ..ops.capacity import kaiming_uniform_bound
from ..optim.state_growth import unwrap_optimizer
from .distributed import all_reduce_mean_, is_distributed
from .fisher import squared_gradient_norms
from .growth import grow_modules_

logger = logging.getLogger(__name__)


class ReleasedScriptRule:
    """First-pass norms captured by `measure`, FI-Ratios from the second pass in `ratios`."""

    def __init__(self, optimizer=None):
        self.optimizer = optimizer
        self._first_pass: Optional[tuple] = None  # (step, (modules,) float64 norms at theta_t)

    def measure(self, step: int, modules: Sequence[SeLoRALinear]) -> None:
        """Optimizer pre-step hook on measuring step `step`: gradient norms at theta_t (no host sync)."""
        self._first_pass = (step, squared_gradient_norms(modules))

    def ratios(self, step: int, modules: Sequence[SeLoRALinear], closure: Optional[Callable[[], torch.Tensor]],
               backward: Optional[Callable[[torch.Tensor], None]], loss_scale: float,
               expanded_once: Set[str]) -> Optional[List[float]]:
        """FI-Ratio of every module for step `step`, or None when the test must move to the next step.

        loss_scale: the AMP loss scale of the second pass (1.0 without one); expanded_once: names of the
        modules whose trial row is live data (the others measure with a zero row K)."""
        if closure is None:
            raise ValueError("trial='released_script' needs after_step(step, closure=...): a function that "
                             "recomputes the loss on the same batch, noise and timesteps (the second pass "
                             "of the released script)")
        first_pass, self._first_pass = self._first_pass, None
        if first_pass is None or first_pass[0] != step:
            logger.warning("step %d: optimizer.step() did not run (skipped by the GradScaler?) or before_forward "
                           "was not called: expansion test moved to the next step", step)
            return None
        first = first_pass[1]
        second = self._second_pass(list(modules), closure, backward, loss_scale, expanded_once)
        if is_distributed():
            first, second = all_reduce_mean_(first.clone()), all_reduce_mean_(second.clone())
        first_host, second_host = first.cpu().tolist(), (second / loss_scale**2).cpu().tolist()
        if not all(math.isfinite(v) for v in first_host + second_host):
            logger.warning("step %d: non-finite gradients in the expansion test: moved to the next step", step)
            return None
        # 0/0 (no gradient at either pass) is nan, never an expansion: as the released script computes it
        return [fi_ratio(a, b) for a, b in zip(first_host, second_host)]

    def _second_pass(self, modules, closure, backward, loss_scale, expanded_once) -> torch.Tensor:
        """Gradients at theta_{t+1} with each module's trial slot live (zero K before its first expansion)."""
        full = [m for m in modules if m.rank >= m.capacity]
        for module in full:  # the live trial slot needs room; growth keeps the function and optimizer state
            grow_modules_([module], next_capacity(module.capacity), self.optimizer)
        params = [p for group in unwrap_optimizer(self.optimizer).param_groups for p in group["params"]] \
            if self.optimizer is not None else []
        params += [p for m in modules for p in (m.lora_A, m.lora_B) if all(p is not q for q in params)]
        saved_grads = [p.grad for p in params]
        saved_trials = []
        for p in params:
            p.grad = None
        with torch.no_grad():
            for module in modules:
                saved_trials.append(module.trial_row.clone())
                if module.selora_name not in expanded_once:
                    module.trial_row.zero_()
                module.lora_A[module.rank].copy_(module.trial_row)
                module.set_live_rank(module.rank + 1)
        try:
            with torch.enable_grad():
                loss = closure()
                if backward is not None:
                    backward(loss)
                elif loss_scale != 1.0:
                    (loss * loss_scale).backward()
                else:
                    loss.backward()
            norms = squared_gradient_norms(modules)
        finally:
            with torch.no_grad():
                for module, trial in zip(modules, saved_trials):
                    module.set_live_rank(module.rank - 1)
                    module.lora_A[module.rank].zero_()
                    module.trial_row.copy_(trial)
            for p, grad in zip(params, saved_grads):
                p.grad = grad
        return norms


def draw_trial_rows(modules: Sequence[SeLoRALinear], seed: int) -> None:
    """Fresh Kaiming-uniform trial rows, drawn in float64 from one generator: the released script adopts a
    fresh draw, not the row it measured with."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            bound = kaiming_uniform_bound(module.in_features)
            row = torch.rand(module.in_features, generator=generator, dtype=torch.float64) * 2 - 1
            module.trial_row.copy_((row * bound).to(module.trial_row))
