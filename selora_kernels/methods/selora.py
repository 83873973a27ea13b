"""SeLoRA as an adapter method: rank-1 adapters that grow where the FI-Ratio test says (ExpansionController).

Injection (peft's machinery), optimizer (SeLoRAAdamW, per-slot Adam steps) and growth inside its steps
(attach_expansion; the released-script rule keeps the explicit calls, it needs a second pass); its files are SeLoRA adapter
files (integrations.adapter_io: ranks, capacities and trial rows, so a resumed run expands as the original
would) and the peft/diffusers export.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from ..config import SeLoRAConfig
from ..expansion.controller import ExpansionController
from ..expansion.optimizer_hooks import attach_expansion
from ..integrations.adapter_io import PEFT_WEIGHT_NAME, export_peft_lora, load_adapter, save_adapter
from ..integrations.peft_method import inject_selora
from ..nn.selora_linear import selora_modules
from ..optim.selora_adamw import SeLoRAAdamW
from .base import AdapterMethod


class SeLoRAMethod(AdapterMethod):
    """SeLoRA with `config` (targets, adapter options and the expansion test)."""

    name = "selora"

    def __init__(self, config: SeLoRAConfig, seed: int = 0, parts=("unet", "text_encoder")):
        if not isinstance(config, SeLoRAConfig):
            raise TypeError(f"SeLoRAMethod needs a SeLoRAConfig, got {type(config).__name__}")
        super().__init__(config.target_modules, parts, seed, config.exclude_modules)
        self.config = config
        self.controller: Optional[ExpansionController] = None
        self.attachment = None  # same_backward: the controller runs inside optimizer.step (attach_expansion)
        self.modules = {}

    @classmethod
    def from_config(cls, config: SeLoRAConfig, seed: int = 0, total_steps: Optional[int] = None,
                    **options) -> "SeLoRAMethod":
        return cls(config, seed=seed, **options)

    def _inject_parts(self) -> None:
        for part, model in self.components.items():
            self.modules.update(inject_selora(model, self.config, prefix=part))

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return SeLoRAAdamW(self.trainable_parameters(), lr=lr)

    def attach(self, optimizer, grad_scaler=None, gradient_accumulation_steps: int = 1) -> None:
        modules = list(self.modules.values())
        if self.config.trial == "same_backward":
            self.attachment = attach_expansion(optimizer, modules, self.config, grad_scaler=grad_scaler,
                                               gradient_accumulation_steps=gradient_accumulation_steps,
                                               seed=self.seed)
            self.controller = self.attachment.controller
        else:  # the released script's rule needs a second forward/backward: explicit calls with a closure
            self.controller = ExpansionController(modules, optimizer, self.config, grad_scaler=grad_scaler,
                                                  seed=self.seed,
                                                  gradient_accumulation_steps=gradient_accumulation_steps)

    def before_forward(self, step: int) -> None:
        if self.attachment is None:
            self.controller.before_forward(step)

    def after_step(self, step: int, closure=None) -> list:
        if self.attachment is None:
            return [d for d in self.controller.after_step(step, closure=closure) if d.expanded]
        decided = []  # the attachment decided inside optimizer.step: this step's decisions are the last ones
        for decision in reversed(self.controller.history):
            if decision.step != step:
                break
            decided.append(decision)
        return [d for d in reversed(decided) if d.expanded]

    def ranks(self) -> Dict[str, int]:
        return {name: m.rank for name, m in selora_modules(list(self.modules.values())).items()}

    def save(self, path, extra_metadata=None) -> Path:
        return save_adapter(path, list(self.modules.values()), self.config, extra_metadata)

    def load(self, path) -> dict:
        return load_adapter(path, list(self.modules.values()), self.config)

    def export(self, directory, weight_name: str = PEFT_WEIGHT_NAME) -> Path:
        return export_peft_lora(directory, self.components, weight_name=weight_name)

    def state_dict(self) -> dict:
        return self.controller.state_dict() if self.controller is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state)
        if self.attachment is not None:
            self.attachment.rearm()

    def describe(self) -> dict:
        c = self.config
        return {"method": self.name, "trial": c.trial, "threshold": c.threshold, "interval": c.interval,
                "max_rank": c.max_rank, "r": c.r, "lora_alpha": c.lora_alpha,
                "target_modules": c.target_modules if isinstance(c.target_modules, str) else list(c.target_modules)}

    def _export_part(self, part: str):
        """Live factors of each adapted layer: A[:r], s B[:, :r] (what export_peft_lora writes)."""
        factors = {}
        for path in self.target_names[part]:
            factors[path] = self.components[part].get_submodule(path).live_factors()
        return factors
