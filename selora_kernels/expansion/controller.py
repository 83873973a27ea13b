"""ExpansionController: the SeLoRA expansion test added to an existing training loop in two calls.

    controller = ExpansionController([unet, text_encoder], optimizer, config)
    for step, batch in enumerate(loader):
        controller.before_forward(step)          # every t-th step: Fisher rides on this step's backward
        loss = compute_loss(batch)
        accelerator.backward(loss)
        optimizer.step(); optimizer.zero_grad()
        controller.after_step(step)              # FI-Ratios, expansions, decision log

Steps count optimizer steps (0-based); with gradient accumulation call before_forward on every micro-batch
with the same step and after_step once per optimizer step. The test runs after steps t-1, 2t-1, ...

Modes (config.trial):
- "same_backward" (default): per-sample Fisher (eq. 3) of the live slots and of a trial slot (row K in a
  buffer, zero B column) accumulated in the ordinary backward; FI-Ratio = FI(expanded) / FI(original);
  expansion adopts K. No extra pass. The trial slot never reaches the optimizer: K is a buffer and the
  zero B column is a dead slot (exactly zero gradient).
- "released_script" (old spelling "reference_code"): the released script's rule (expansion/released_rule.py):
  squared norm of the batch-mean gradient at theta_t (captured by an optimizer pre-step hook) vs. the same
  after optimizer.step() on the same batch with the trial slot live (a second forward/backward:
  `after_step(step, closure=...)`, the closure recomputes the loss on the same batch/noise/timesteps); K is
  zero until a module's first expansion; a fresh row is adopted; the module's whole optimizer state is reset
  on growth.

AMP: pass the GradScaler (accelerate: `accelerator.scaler`): Fisher is divided by scale^2 and a step whose
statistics or gradients are not finite is not decided (the test moves to the next step).
Inputs holding inf/NaN while measuring raise ValueError naming the modules: before optimizer.step()
moves anything (a pre-step hook, when the controller has the optimizer), else at the decision (after_step);
not when the GradScaler skipped that step (then they are an fp16 overflow and the test moves on).
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

from ..config import SeLoRAConfig, canonical_mode
from ..fisher_stats import nonfinite_rows, raise_on_nonfinite_inputs
from ..nn.selora_linear import SeLoRALinear, selora_modules
from ..optim.state_growth import check_supported, unwrap_optimizer
from .distributed import GrownGradientSync, all_reduce_sum_, check_same_ranks, is_distributed
from .fisher import batched_fisher_scores
from .growth import expand_modules
from .released_rule import ReleasedScriptRule, draw_trial_rows

logger = logging.getLogger(__name__)


class Decision(NamedTuple):
    """One module's expansion test: FI-Ratio and the rank before/after (equal when not expanded)."""

    step: int
    module: str
    ratio: float
    old_rank: int
    new_rank: int

    @property
    def expanded(self) -> bool:
        return self.new_rank > self.old_rank


def _seed_for(seed: int, step: int) -> int:
    # identical on every process, different at every test
    return (seed * 1_000_003 + step * 7_919 + 1) % (2**62)


class ExpansionController:
    """Runs the SeLoRA expansion test every `config.interval` optimizer steps; see the module docstring.

    model_or_modules: the adapted model(s) (or SeLoRALinear modules); optimizer: the one training them
    (state grows with the buffers; None to only measure); grad_scaler: an AMP GradScaler, if any;
    gradient_accumulation_steps: how many micro-batches feed one optimizer step (the backward then sees
    loss / steps); loss_reduction: "mean" or "sum" over the batch; seed: trial rows drawn at expansions.
    """

    def __init__(self, model_or_modules, optimizer=None, config: Optional[SeLoRAConfig] = None, *,
                 grad_scaler=None, gradient_accumulation_steps: int = 1, loss_reduction: str = "mean",
                 seed: int = 0):
        self.config = config if config is not None else SeLoRAConfig()
        if not isinstance(self.config, SeLoRAConfig):
            raise TypeError(f"ExpansionController: config must be a SeLoRAConfig, got {type(config).__name__}")
        self.modules: Dict[str, SeLoRALinear] = selora_modules(model_or_modules)
        if not self.modules:
            raise ValueError("ExpansionController: no SeLoRALinear modules found; call inject_selora first")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if int(gradient_accumulation_steps) < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        self.loss_reduction = loss_reduction
        self.seed = int(seed)
        self.step_count = 0  # optimizer steps completed (used when no step is passed)
        self.history: List[Decision] = []  # every module's test, in order
        self.expanded_once = set()  # released_script: modules whose trial K is no longer zero
        self._measuring_step: Optional[int] = None
        self._pending = False  # a due test was skipped (non-finite step): run it at the next step
        self._scale_at_measure = None
        self._released = ReleasedScriptRule(optimizer) if self.config.trial == "released_script" else None
        self._hook = None
        if optimizer is not None:
            check_supported(optimizer)
            self._check_optimizer_holds_adapters()
            hook = self._capture_first_pass if self._released is not None else self._check_inputs
            self._hook = unwrap_optimizer(optimizer).register_step_pre_hook(hook)
        check_same_ranks(list(self.modules.values()))
        self._grad_sync = GrownGradientSync(self.module_list)

    # ------------------------------------------------------------------ public API
    @property
    def module_list(self) -> List[SeLoRALinear]:
        return list(self.modules.values())

    def ranks(self) -> Dict[str, int]:
        return {name: m.rank for name, m in self.modules.items()}

    def total_rank(self) -> int:
        return sum(m.rank for m in self.modules.values())

    def is_due(self, step: Optional[int] = None) -> bool:
        step = self.step_count if step is None else step
        return self._pending or (step + 1) % self.config.interval == 0

    def before_forward(self, step: Optional[int] = None) -> None:
        """Call before the forward of every (micro-)batch of optimizer step `step`."""
        step = self.step_count if step is None else step
        if not self.is_due(step) or self._measuring_step == step:
            return
        self._measuring_step = step
        if self.config.trial == "same_backward":
            for module in self.modules.values():
                module.start_measuring(self.loss_reduction)
            self._scale_at_measure = self._current_scale()

    def after_step(self, step: Optional[int] = None, closure: Optional[Callable[[], torch.Tensor]] = None,
                   backward: Optional[Callable[[torch.Tensor], None]] = None) -> List[Decision]:
        """Call once after optimizer.step() of step `step`; returns this step's decisions (empty if none).

        closure (released_script only): recomputes and returns the loss on the same batch, noise and
        timesteps as the step; backward: how to backpropagate it (default: loss.backward(), scaled by the
        GradScaler when one was given).
        """
        step = self.step_count if step is None else step
        self.step_count = step + 1
        if self._measuring_step != step:
            return []
        self._measuring_step = None
        if self.config.trial == "same_backward":
            decisions = self._decide_same_backward(step)
        else:
            decisions = self._decide_released(step, closure, backward)
        self._pending = decisions is None
        return decisions or []

    def close(self) -> None:
        """Stops measuring and removes the optimizer hook."""
        for module in self.modules.values():
            module.stop_measuring()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._grad_sync.remove()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "seed": self.seed, "pending": self._pending,
                "expanded_once": sorted(self.expanded_once), "trial": self.config.trial,
                "history": [tuple(d) for d in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if canonical_mode(state.get("trial", self.config.trial)) != self.config.trial:
            raise ValueError(f"ExpansionController: checkpoint was taken with trial={state['trial']!r}, this "
                             f"controller runs trial={self.config.trial!r}")
        unknown = set(state.get("expanded_once", [])) - self.modules.keys()
        if unknown:
            raise ValueError(f"ExpansionController: checkpoint names modules this model does not have: "
                             f"{sorted(unknown)[:3]}")
        self.step_count = int(state["step_count"])
        self.seed = int(state.get("seed", self.seed))
        self._pending = bool(state.get("pending", False))
        self.expanded_once = set(state.get("expanded_once", []))
        self.history = [Decision(*row) for row in state.get("history", [])]

    # ------------------------------------------------------------------ same-backward test
    def _decide_same_backward(self, step: int) -> Optional[List[Decision]]:
        modules = self.module_list
        scale = self._scale_at_measure or 1.0
        fisher_scale = (self.gradient_accumulation_steps / scale) ** 2
        # An fp16 forward that overflowed feeds inf to later layers: with the GradScaler skipping the step,
        # that is an overflow to retry, not bad data to raise on.
        overflowed = self._step_was_skipped()
        try:
            scores = batched_fisher_scores(modules, reduce=all_reduce_sum_ if is_distributed() else None,
                                           fisher_scale=fisher_scale, check_inputs=not overflowed)
        finally:
            for module in modules:
                module.stop_measuring()
        if not all(math.isfinite(s.original) and math.isfinite(s.expanded) for s in scores) or overflowed:
            logger.warning("step %d: non-finite Fisher statistics (AMP overflow?): expansion test moved to the "
                           "next step", step)
            return None
        if all(s.samples == 0 for s in scores):
            logger.warning("step %d: no Fisher statistics were accumulated (no backward through the adapters "
                           "between before_forward and after_step?)", step)
        return self._apply(step, [s.ratio for s in scores], adopt_fresh_rows=False, reset_state=False)

    def _current_scale(self) -> Optional[float]:
        if self.grad_scaler is None or not getattr(self.grad_scaler, "is_enabled", lambda: True)():
            return None
        return float(self.grad_scaler.get_scale())

    def _step_was_skipped(self) -> bool:
        # GradScaler lowers its scale exactly when it skipped the step for inf/NaN gradients
        before = self._scale_at_measure
        after = self._current_scale()
        return before is not None and after is not None and after < before

    def _check_inputs(self, optimizer, args, kwargs):
        # Optimizer pre-step hook on measuring steps: inputs that held inf/NaN raise before any parameter
        # moves (one small all-reduce and one host read per measuring step). A GradScaler that skips the
        # step never calls optimizer.step, so an fp16 overflow does not get here.
        if self._measuring_step is None:
            return
        modules = self.module_list
        counts = torch.stack([nonfinite_rows(m.fisher_statistics()).double() for m in modules])
        if is_distributed():
            counts = all_reduce_sum_(counts)
        raise_on_nonfinite_inputs([m.selora_name for m in modules], counts.cpu().tolist())

    # ------------------------------------------------------------------ released-script test
    def _capture_first_pass(self, optimizer, args, kwargs):
        if self._measuring_step is not None:
            self._released.measure(self._measuring_step, self.module_list)

    def _decide_released(self, step, closure, backward) -> Optional[List[Decision]]:
        ratios = self._released.ratios(step, self.module_list, closure, backward, self._current_scale() or 1.0,
                                       self.expanded_once)
        if ratios is None:
            return None
        return self._apply(step, ratios, adopt_fresh_rows=True, reset_state=True)

    # ------------------------------------------------------------------ decisions
    def _apply(self, step: int, ratios: List[float], adopt_fresh_rows: bool, reset_state: bool) -> List[Decision]:
        threshold, max_rank = self.config.threshold, self.config.max_rank
        chosen, decisions = [], []
        for (name, module), ratio in zip(self.modules.items(), ratios):
            grow = ratio >= threshold and (max_rank is None or module.rank < max_rank)
            if grow:
                chosen.append(module)
            decisions.append(Decision(step, name, float(ratio), module.rank, module.rank + int(grow)))
        seed = _seed_for(self.seed, step)
        if chosen:
            if adopt_fresh_rows:
                draw_trial_rows(chosen, seed + 1)
            expand_modules(chosen, optimizer=self.optimizer, seed=seed, reset_optimizer_state=reset_state)
            self.expanded_once.update(m.selora_name for m in chosen)
        self.history.extend(decisions)
        self._log(step, decisions)
        return decisions

    def _log(self, step: int, decisions: List[Decision]) -> None:
        # one summary line per test on the main process; every module's test at DEBUG
        for d in decisions:
            logger.debug("step %d: %s FI-Ratio %.4f (lambda %g): rank %d -> %d", d.step, d.module, d.ratio,
                         self.config.threshold, d.old_rank, d.new_rank)
        if is_distributed() and torch.distributed.get_rank() != 0:
            return
        grown = sum(d.expanded for d in decisions)
        finite = [d.ratio for d in decisions if math.isfinite(d.ratio)]
        logger.info("step %d: SeLoRA expansion test: %d of %d modules grew, total rank %d, max FI-Ratio %s "
                    "(lambda %g)", step, grown, len(decisions), self.total_rank(),
                    f"{max(finite):.4f}" if finite else "nan", self.config.threshold)

    def _check_optimizer_holds_adapters(self) -> None:
        held = {id(p) for group in unwrap_optimizer(self.optimizer).param_groups for p in group["params"]}
        for name, module in self.modules.items():
            for label, param in (("lora_A", module.lora_A), ("lora_B", module.lora_B)):
                if id(param) not in held:
                    raise ValueError(f"{name}.{label} is not in the optimizer: build the optimizer over the "
                                     f"parameters that require grad after inject_selora (expected every "
                                     f"adapter parameter, found {len(held)} parameters)")
            if id(module.trial_row) in held:
                raise ValueError(f"{name}.trial_row is in the optimizer; the trial slot must stay out of it")
