"""AdaLoRA baseline: peft's AdaLoRA, init rank 6 -> target average rank 4, on SeLoRA's target layers.

Both parts (UNet and text encoder) sit in one container module under one peft `AdaLoraModel`, so one
RankAllocator ranks every triplet of both parts against one global budget, as peft does for a single model
(modules are replaced in place; the container only gives them common names).

Two things peft only does inside `PeftModel.forward` for models that return `.loss` -- never for a diffusion
UNet -- so the method does them by hand:
- the orthogonal regulariser R = mean over adapter matrices P of ||P P^T - I||_F (A: P = A; B: P = B^T),
  weighted by orth_reg_weight, returned by `extra_loss()` for the trainer to add to the diffusion loss;
- `update_and_allocate(step)` after optimizer.step() and before zero_grad() (it reads the gradients). HF
  Trainer does not call it either (a known peft limitation): ranks then stay at init_r. `attach(optimizer)`
  registers it as a post-hook of the optimizer's step, so it runs at the right moment whatever order the
  trainer calls zero_grad and after_step in; without attach, `after_step(step)` must come before zero_grad.
  A step the optimizer skips (fp16: the GradScaler found inf/NaN gradients and did not call optimizer.step)
  gets no allocation: with attach the hook does not fire and after_step only logs it (debug); without attach,
  after_step skips when a gradient is not finite.
The budget schedule needs the total number of optimizer steps: `AdaLoRAMethod(total_steps=N)`; built from the
registry (`make_method("adalora", config, total_steps=N)`), it gets the run's.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
from torch import nn

from ..optim.state_growth import unwrap_optimizer
from .base import AdapterMethod

ADAPTER_NAME = "default"
logger = logging.getLogger(__name__)


class AdaLoRAMethod(AdapterMethod):
    """init_r / target_r: peft's. tinit, tfinal, deltaT: ints (steps), or None for the fractions of
    total_steps given by tinit_fraction / tfinal_fraction (warm-up before pruning, final fixed-rank phase)
    and deltaT = 1 (re-mask every step, peft's default)."""

    name = "adalora"
    needs_total_steps = True

    def __init__(self, init_r: int = 6, target_r: int = 4, alpha=None, tinit: Optional[int] = None,
                 tfinal: Optional[int] = None, deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85,
                 orth_reg_weight: float = 0.5, tinit_fraction: float = 0.1, tfinal_fraction: float = 0.2,
                 total_steps: Optional[int] = None, target_modules="released_script",
                 parts=("unet", "text_encoder"), seed: int = 0, exclude_modules=()):
        super().__init__(target_modules, parts, seed, exclude_modules)
        if not (isinstance(init_r, int) and isinstance(target_r, int) and 1 <= target_r <= init_r):
            raise ValueError(f"AdaLoRAMethod: need ints 1 <= target_r <= init_r, got init_r={init_r!r}, "
                             f"target_r={target_r!r}")
        if orth_reg_weight < 0:
            raise ValueError(f"AdaLoRAMethod: orth_reg_weight must be >= 0, got {orth_reg_weight}")
        self.init_r, self.target_r = init_r, target_r
        self.alpha = float(init_r if alpha is None else alpha)  # scale alpha / init_r = 1, like the LoRA baseline
        self.tinit, self.tfinal, self.deltaT = tinit, tfinal, deltaT
        self.beta1, self.beta2, self.orth_reg_weight = beta1, beta2, orth_reg_weight
        self.tinit_fraction, self.tfinal_fraction = tinit_fraction, tfinal_fraction
        self.total_steps = total_steps
        self.tuner = None
        self.last_regularizer: Optional[float] = None
        self._current_step: Optional[int] = None
        self._allocated_step: Optional[int] = None
        self._hook = None

    def schedule(self, total_steps: int) -> Dict[str, int]:
        """tinit, tfinal, deltaT for a run of `total_steps` (peft needs tinit < total_steps - tfinal)."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"AdaLoRAMethod: total_steps must be an int >= 1 (the rank budget schedule needs the "
                             f"number of optimizer steps: AdaLoRAMethod(total_steps=N)), got {total_steps!r}")
        tinit = int(self.tinit_fraction * total_steps) if self.tinit is None else self.tinit
        tfinal = int(self.tfinal_fraction * total_steps) if self.tfinal is None else self.tfinal
        if tinit >= total_steps - tfinal:
            raise ValueError(f"AdaLoRAMethod: tinit={tinit} must be < total_steps - tfinal = "
                             f"{total_steps} - {tfinal}: no budgeting phase is left")
        return {"tinit": tinit, "tfinal": tfinal, "deltaT": self.deltaT}

    def _inject_parts(self) -> None:
        from peft import AdaLoraConfig  # peft: only the baselines need it
        from peft.tuners.adalora import AdaLoraModel

        schedule = self.schedule(self.total_steps)
        self.container = nn.ModuleDict(self.models)
        targets = [f"{part}.{path}" for part in self.models for path in self.target_names[part]]
        self.config = AdaLoraConfig(init_r=self.init_r, target_r=self.target_r, lora_alpha=self.alpha,
                                    target_modules=targets, total_step=self.total_steps, beta1=self.beta1,
                                    beta2=self.beta2, orth_reg_weight=self.orth_reg_weight, **schedule)
        self.tuner = AdaLoraModel(self.container, self.config, ADAPTER_NAME)

    # ---------------------------------------------------------------- trainer hooks
    def orthogonal_regularizer(self) -> torch.Tensor:
        """Unweighted R = mean over every lora_A / lora_B of ||P P^T - I||_F (peft's AdaLoraModel.forward)."""
        self._check_injected()
        total, count = None, 0
        for name, param in self.container.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and ADAPTER_NAME in name:
                gram = param @ param.T if "lora_A" in name else param.T @ param
                eye = torch.eye(*gram.shape, device=gram.device, dtype=gram.dtype)
                term = torch.linalg.matrix_norm(gram - eye, ord="fro")
                total = term if total is None else total + term
                count += 1
        if count == 0:
            raise RuntimeError(f"{self.name}: no lora_A/lora_B parameters found for the orthogonal regulariser")
        return total / count

    def extra_loss(self) -> torch.Tensor:
        regularizer = self.orthogonal_regularizer()
        self.last_regularizer = float(regularizer.detach())
        return self.orth_reg_weight * regularizer

    def attach(self, optimizer, grad_scaler=None, gradient_accumulation_steps: int = 1) -> None:
        inner = unwrap_optimizer(optimizer)  # accelerate wraps the torch optimizer
        if self._hook is not None:
            self._hook.remove()
        self._hook = inner.register_step_post_hook(lambda *_: self._allocate(self._next_step()))

    def before_forward(self, step: int) -> None:
        self._current_step = step

    def after_step(self, step: int, closure=None) -> list:
        if self._allocated_step == step:
            return []
        if self._hook is not None:
            # attached: the optimizer's post-step hook allocates. It did not fire, so optimizer.step() did not
            # run: the GradScaler skipped this step (inf/NaN gradients under fp16). Nothing to allocate from.
            logger.debug("%s: optimizer step %d was skipped (no post-step hook call, e.g. the GradScaler found "
                         "inf/NaN gradients): no rank allocation this step", self.name, step)
            return []
        if self._nonfinite_gradients():
            logger.debug("%s: step %d has inf/NaN adapter gradients (a step the GradScaler skips): no rank "
                         "allocation this step", self.name, step)
            return []
        self._allocate(step)  # no optimizer hook (attach not called): gradients must still be there
        return []

    def _nonfinite_gradients(self) -> bool:
        return any(p.grad is not None and not torch.isfinite(p.grad).all()
                   for p in self.container.parameters() if p.requires_grad)

    def _next_step(self) -> int:
        if self._current_step is not None:
            return self._current_step
        return 0 if self._allocated_step is None else self._allocated_step + 1

    def _allocate(self, step: int) -> None:
        """peft's update_and_allocate once per step: sensitivity EMA from |w * grad|, then masking to budget."""
        self._check_injected()
        if self._allocated_step == step:
            return
        missing = [n for n, p in self.container.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            raise RuntimeError(f"{self.name}: update_and_allocate at step {step}: {len(missing)} adapter parameters "
                               f"have no gradient (e.g. {missing[0]}); it must run after optimizer.step() and "
                               f"before zero_grad() (call attach(optimizer), or after_step before zero_grad)")
        self.tuner.update_and_allocate(step)
        self._allocated_step = step

    def _options(self) -> dict:
        return {"init_r": self.init_r, "target_r": self.target_r, "alpha": self.alpha,
                "total_steps": self.total_steps, "orth_reg_weight": self.orth_reg_weight,
                **(self.schedule(self.total_steps) if self.total_steps else {})}

    def state_dict(self) -> dict:
        allocator = self.tuner.rankallocator
        return {"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
                "rank_pattern": self.config.rank_pattern, "allocated_step": self._allocated_step}

    def load_state_dict(self, state: dict) -> None:
        allocator = self.tuner.rankallocator
        allocator.ipt, allocator.exp_avg_ipt = state["ipt"], state["exp_avg_ipt"]
        allocator.exp_avg_unc = state["exp_avg_unc"]
        self.config.rank_pattern = state["rank_pattern"]
        self._allocated_step = state["allocated_step"]

    # ---------------------------------------------------------------- reporting / export
    def _svd_layers(self, part: str):
        from peft.tuners.adalora import SVDLinear  # peft: only the baselines need it

        return self.injected_layers(part, SVDLinear, "peft's SVDLinear")

    def live_mask(self, part: str, path: str, layer) -> torch.Tensor:
        """Boolean (init_r,) mask of the triplets the allocator keeps. peft records it in
        config.rank_pattern once it first masks; before that every triplet is live (E starts at exactly 0, so
        counting non-zero E would say rank 0)."""
        pattern = self.config.rank_pattern
        key = f"{part}.{path}.lora_E.{ADAPTER_NAME}"
        if pattern is None:
            return torch.ones(layer.lora_E[ADAPTER_NAME].shape[0], dtype=torch.bool)
        if key not in pattern:
            key = f"{part}.{path}.lora_E"  # peft strips the adapter name from saved patterns
        if key not in pattern:
            raise KeyError(f"{self.name}: no rank_pattern entry for {part}.{path}")
        return torch.as_tensor(pattern[key], dtype=torch.bool).view(-1)

    def ranks(self) -> Dict[str, int]:
        """Ranks the allocator keeps per module (init_r until its first masking)."""
        return {f"{part}.{path}": int(self.live_mask(part, path, layer).sum())
                for part in self.models for path, layer in self._svd_layers(part)}

    def _export_part(self, part: str):
        factors = {}
        for path, layer in self._svd_layers(part):
            lora_a, lora_e = layer.lora_A[ADAPTER_NAME], layer.lora_E[ADAPTER_NAME]
            lora_b = layer.lora_B[ADAPTER_NAME]
            live = self.live_mask(part, path, layer).to(lora_e.device)
            scale = layer.scaling[ADAPTER_NAME] / (float(layer.ranknum[ADAPTER_NAME]) + 1e-5)
            factors[path] = ((lora_a * lora_e)[live], lora_b[:, live] * scale)
        return factors

    def _effective_count(self, part: str) -> int:
        # unmasked triplets: a row of A, a column of B and one singular value each
        return sum(a.shape[0] * (a.shape[1] + b.shape[0] + 1) for a, b in self._export_part(part).values())
