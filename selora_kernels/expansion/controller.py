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
- "reference_code": the released script: squared norm of the batch-mean gradient at theta_t (captured by an
  optimizer pre-step hook) vs. the same after optimizer.step() on the same batch with the trial slot live
  (a second forward/backward: `after_step(step, closure=...)`, the closure recomputes the loss on the same
  batch/noise/timesteps); K is zero until a module's first expansion; a fresh row is adopted; the module's
  whole optimizer state is reset on growth.

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

from ..config import SeLoRAConfig, next_capacity
from ..nn.growth import expand_modules, grow_modules_
from ..nn.selora_linear import SeLoRALinear, kaiming_bound, raise_on_nonfinite_inputs
from ..ops.reference import FISHER_COL_NONFINITE, FISHER_ROW_COUNT
from ..optim.state_growth import check_supported, unwrap_optimizer
from .distributed import all_reduce_mean_, all_reduce_sum_, check_same_ranks, is_distributed
from .fisher import batched_fisher_scores, squared_gradient_norms

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


def collect_modules(model_or_modules) -> Dict[str, SeLoRALinear]:
    """Name -> SeLoRALinear of a model, a module, or a list/dict of them (names: `selora_name`)."""
    if isinstance(model_or_modules, SeLoRALinear):
        return {model_or_modules.selora_name: model_or_modules}
    if isinstance(model_or_modules, torch.nn.Module):
        return {m.selora_name: m for m in model_or_modules.modules() if isinstance(m, SeLoRALinear)}
    items = list(model_or_modules.values()) if isinstance(model_or_modules, dict) else list(model_or_modules)
    found: Dict[str, SeLoRALinear] = {}
    for item in items:
        for name, module in collect_modules(item).items():
            if name in found and found[name] is not module:
                raise ValueError(f"two different SeLoRA modules are both named {name!r}: inject each model "
                                 f"with its own prefix (e.g. 'unet', 'text_encoder')")
            found[name] = module
    return found


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
        self.modules: Dict[str, SeLoRALinear] = collect_modules(model_or_modules)
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
        self.expanded_once = set()  # reference_code: modules whose trial K is no longer zero
        self._measuring_step: Optional[int] = None
        self._pending = False  # a due test was skipped (non-finite step): run it at the next step
        self._scale_at_measure = None
        self._first_pass_norms: Optional[torch.Tensor] = None
        self._hook = None
        if optimizer is not None:
            check_supported(optimizer)
            self._check_optimizer_holds_adapters()
            hook = self._capture_first_pass if self.config.trial == "reference_code" else self._check_inputs
            self._hook = unwrap_optimizer(optimizer).register_step_pre_hook(hook)
        check_same_ranks(list(self.modules.values()))

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
        self._first_pass_norms = None
        if self.config.trial == "same_backward":
            for module in self.modules.values():
                module.start_measuring(self.loss_reduction)
            self._scale_at_measure = self._current_scale()

    def after_step(self, step: Optional[int] = None, closure: Optional[Callable[[], torch.Tensor]] = None,
                   backward: Optional[Callable[[torch.Tensor], None]] = None) -> List[Decision]:
        """Call once after optimizer.step() of step `step`; returns this step's decisions (empty if none).

        closure (reference_code only): recomputes and returns the loss on the same batch, noise and
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
            decisions = self._decide_reference(step, closure, backward)
        self._pending = decisions is None
        return decisions or []

    def close(self) -> None:
        """Stops measuring and removes the optimizer hook."""
        for module in self.modules.values():
            module.stop_measuring()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "seed": self.seed, "pending": self._pending,
                "expanded_once": sorted(self.expanded_once), "trial": self.config.trial,
                "history": [tuple(d) for d in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("trial", self.config.trial) != self.config.trial:
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
        counts = torch.stack([m.fisher_statistics()[FISHER_ROW_COUNT, FISHER_COL_NONFINITE].double()
                              for m in modules])
        if is_distributed():
            counts = all_reduce_sum_(counts)
        raise_on_nonfinite_inputs([m.selora_name for m in modules], counts.cpu().tolist())

    # ------------------------------------------------------------------ reference-code test
    def _capture_first_pass(self, optimizer, args, kwargs):
        if self._measuring_step is not None and self.config.trial == "reference_code":
            self._first_pass_norms = squared_gradient_norms(self.module_list)

    def _decide_reference(self, step, closure, backward) -> Optional[List[Decision]]:
        if closure is None:
            raise ValueError("trial='reference_code' needs after_step(step, closure=...): a function that "
                             "recomputes the loss on the same batch, noise and timesteps (the second pass "
                             "of the released script)")
        if self._first_pass_norms is None:
            logger.warning("step %d: optimizer.step() did not run (skipped by the GradScaler?) or before_forward "
                           "was not called: expansion test moved to the next step", step)
            return None
        first = self._first_pass_norms
        self._first_pass_norms = None
        second, scale = self._second_pass(closure, backward)
        if is_distributed():
            first, second = all_reduce_mean_(first.clone()), all_reduce_mean_(second.clone())
        first_host, second_host = first.cpu().tolist(), (second / scale**2).cpu().tolist()
        if not all(math.isfinite(v) for v in first_host + second_host):
            logger.warning("step %d: non-finite gradients in the expansion test: moved to the next step", step)
            return None
        ratios = [(b / a) if a > 0 else (math.inf if b > 0 else 1.0) for a, b in zip(first_host, second_host)]
        return self._apply(step, ratios, adopt_fresh_rows=True, reset_state=True)

    def _second_pass(self, closure, backward):
        """Gradients at theta_{t+1} with each module's trial slot live (zero K before its first expansion)."""
        modules = self.module_list
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
                if module.selora_name not in self.expanded_once:
                    module.trial_row.zero_()
                module.lora_A[module.rank].copy_(module.trial_row)
                module.live_rank.add_(1)
                module._rank += 1
        scale = self._current_scale() or 1.0
        try:
            with torch.enable_grad():
                loss = closure()
                if backward is not None:
                    backward(loss)
                elif scale != 1.0:
                    (loss * scale).backward()
                else:
                    loss.backward()
            norms = squared_gradient_norms(modules)
        finally:
            with torch.no_grad():
                for module, trial in zip(modules, saved_trials):
                    module._rank -= 1
                    module.live_rank.sub_(1)
                    module.lora_A[module.rank].zero_()
                    module.trial_row.copy_(trial)
            for p, grad in zip(params, saved_grads):
                p.grad = grad
        return norms, scale

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
                self._draw_trial_rows(chosen, seed + 1)
            expand_modules(chosen, optimizer=self.optimizer, seed=seed, reset_optimizer_state=reset_state)
            self.expanded_once.update(m.selora_name for m in chosen)
        self.history.extend(decisions)
        for d in decisions:
            if d.expanded:
                logger.info("step %d: %s FI-Ratio %.4f >= %g: rank %d -> %d", d.step, d.module, d.ratio,
                            threshold, d.old_rank, d.new_rank)
        return decisions

    @staticmethod
    def _draw_trial_rows(modules, seed: int) -> None:
        # the released script adopts a fresh Kaiming draw, not the row it measured with
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in modules:
                bound = kaiming_bound(module.in_features)
                row = torch.rand(module.in_features, generator=generator, dtype=torch.float64) * 2 - 1
                module.trial_row.copy_((row * bound).to(module.trial_row))

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
