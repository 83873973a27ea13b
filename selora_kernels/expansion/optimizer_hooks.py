"""Growth without calls in the training loop: `attach_expansion(optimizer)` once, after the optimizer exists.

    optimizer = SeLoRAAdamW(params, lr=..., betas=..., weight_decay=..., eps=...)
    unet, optimizer, ... = accelerator.prepare(unet, optimizer, ...)
    attach_expansion(optimizer)           # the loop, saving and resuming stay as they are

It runs an ExpansionController (same rule, same decisions as its explicit before_forward/after_step calls)
from the optimizer's side:
- the end of an optimizer step (one per gradient-accumulation window) takes the due decision, after the
  update, exactly where after_step would, and arms measuring for the next window when that one is due
  (every micro-batch of it then accumulates Fisher in its backward);
- with a GradScaler (accelerate's, found on its AcceleratedOptimizer, or passed), the window ends at
  `scaler.update()`, which runs also when the scaler skipped an fp16-overflowed step: that step is counted
  and its test moves to the next step, as after_step does;
- `optimizer.state_dict()` carries the controller's state (step, pending test, decision history) and what a
  LoRA-layout adapter file cannot hold exactly (trial rows, B before the scale is folded in);
  `optimizer.load_state_dict()` restores them, so accelerate's save_state/load_state (or any loop that
  saves the optimizer) resumes bit-identically once the model's adapter was loaded first.
Modules, config and the accumulation window are found from the optimizer when not given: the SeLoRA
modules owning its parameters, the config they were injected with, accelerate's accumulation steps.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..config import SeLoRAConfig
from ..nn.selora_linear import SeLoRALinear, selora_modules
from ..nn.slots import owner_of
from ..optim.state_growth import unwrap_optimizer
from .controller import ExpansionController

STATE_KEY = "selora_expansion"


def injected_config(modules: Dict[str, SeLoRALinear]) -> SeLoRAConfig:
    """The config the modules were injected with (peft path), SeLoRAConfig() when they carry none; raises
    when they were injected with different expansion settings."""
    configs = [getattr(m, "selora_config", None) for m in modules.values()]
    settings = {(c.threshold, c.interval, c.max_rank, c.trial): c for c in configs if c is not None}
    if len(settings) > 1:
        raise ValueError(f"attach_expansion: the modules were injected with different expansion settings "
                         f"(threshold, interval, max_rank, trial) {sorted(settings, key=str)}; pass config=")
    return next(iter(settings.values())) if settings else SeLoRAConfig()


def optimizer_modules(optimizer) -> Dict[str, SeLoRALinear]:
    """name -> SeLoRA module for every adapter buffer the optimizer holds (in parameter order)."""
    modules: Dict[str, SeLoRALinear] = {}
    for group in unwrap_optimizer(optimizer).param_groups:
        for param in group["params"]:
            owner = owner_of(param)
            if isinstance(owner, SeLoRALinear):
                modules.setdefault(owner.selora_name, owner)
    return modules


class AttachedExpansion:
    """The hooks of attach_expansion; `controller` is the ExpansionController they drive."""

    def __init__(self, optimizer, controller: ExpansionController, grad_scaler=None):
        self.controller = controller
        self.optimizer = unwrap_optimizer(optimizer)
        self.grad_scaler = grad_scaler
        self._pending_state = None
        self._handles = [self.optimizer.register_state_dict_post_hook(self._save_state),
                         self.optimizer.register_load_state_dict_pre_hook(self._take_state),
                         self.optimizer.register_load_state_dict_post_hook(self._restore_state)]
        self._scaler_update = None
        if grad_scaler is not None and grad_scaler.is_enabled():
            # the scaler's update runs once per optimizer step, skipped (overflow) or not
            self._scaler_update = grad_scaler.update

            def update(*args, **kwargs):
                result = self._scaler_update(*args, **kwargs)
                self._window_end()
                return result
            grad_scaler.update = update
        else:
            self._handles.append(self.optimizer.register_step_post_hook(lambda *_: self._window_end()))
        controller.before_forward(controller.step_count)

    def _window_end(self) -> None:
        step = self.controller.step_count
        self.controller.after_step(step)
        self.controller.before_forward(step + 1)

    # ---------------------------------------------------------------- state in the optimizer's state dict
    def _save_state(self, optimizer, state_dict):
        exact = {}
        for name, module in self.controller.modules.items():
            exact[name] = {"rank": module.rank, "lora_B": module.lora_B[:, :module.rank].detach().clone(),
                           "trial_row": module.trial_row.detach().clone()}
        state_dict[STATE_KEY] = {"controller": self.controller.state_dict(), "modules": exact}
        return state_dict

    def _take_state(self, optimizer, state_dict):
        state_dict = dict(state_dict)
        self._pending_state = state_dict.pop(STATE_KEY, None)
        return state_dict

    def _restore_state(self, optimizer) -> None:
        saved, self._pending_state = self._pending_state, None
        if saved is None:
            return
        modules = self.controller.modules
        for name, entry in saved["modules"].items():
            module = modules.get(name)
            if module is None:
                raise ValueError(f"optimizer state names SeLoRA module {name!r}, which this model does not have")
            if module.rank != entry["rank"]:
                raise ValueError(f"{name}: the optimizer state was saved at rank {entry['rank']} but the module is "
                                 f"at rank {module.rank}: load the adapter weights (the model) before the "
                                 f"optimizer state, from the same checkpoint")
            with torch.no_grad():
                module.lora_B[:, :module.rank].copy_(entry["lora_B"])
                module.trial_row.copy_(entry["trial_row"])
        self.controller.load_state_dict(saved["controller"])
        self.rearm()

    def rearm(self) -> None:
        """Measuring as the controller's restored step count says (after its state was loaded)."""
        for module in self.controller.modules.values():
            module.stop_measuring()
        self.controller._measuring_step = None
        self.controller.before_forward(self.controller.step_count)

    def remove(self) -> None:
        """Detaches the hooks (the controller keeps its state)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._scaler_update is not None:
            self.grad_scaler.update = self._scaler_update
            self._scaler_update = None
        self.controller.close()


def attach_expansion(optimizer, model_or_modules=None, config: Optional[SeLoRAConfig] = None, *,
                     grad_scaler=None, gradient_accumulation_steps: Optional[int] = None,
                     loss_reduction: str = "mean", seed: int = 0) -> AttachedExpansion:
    """Makes SeLoRA grow inside `optimizer`'s steps (see the module docstring); returns the attachment
    (`.controller` has the decisions: `history`, `ranks()`).

    optimizer: SeLoRAAdamW (or Adam/AdamW/SGD), bare or accelerate-wrapped (then its GradScaler and
    gradient-accumulation steps are used). model_or_modules: default the SeLoRA modules of the optimizer's
    parameters. config: default the one the modules were injected with (SeLoRAConfig() if none).
    """
    modules = optimizer_modules(optimizer) if model_or_modules is None else model_or_modules
    if not modules:
        raise ValueError("attach_expansion: the optimizer holds no SeLoRA adapter parameters; build it over the "
                         "parameters that require grad after the SeLoRA adapter was added")
    if config is None:
        config = injected_config(selora_modules(modules))
    if config.trial != "same_backward":
        raise ValueError(f"attach_expansion runs trial='same_backward'; trial={config.trial!r} needs a second "
                         f"forward/backward: use ExpansionController.after_step(step, closure=...) in the loop")
    if grad_scaler is None:
        grad_scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer
    if gradient_accumulation_steps is None:
        gradient_accumulation_steps = getattr(getattr(optimizer, "gradient_state", None), "num_steps", 1) or 1
    controller = ExpansionController(modules, optimizer, config, grad_scaler=grad_scaler,
                                     gradient_accumulation_steps=gradient_accumulation_steps,
                                     loss_reduction=loss_reduction, seed=seed)
    return AttachedExpansion(optimizer, controller, grad_scaler)
