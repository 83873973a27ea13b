"""Adapter methods the trainer can run, behind one small interface (SeLoRA here; LoRA/DyLoRA/AdaLoRA
baselines plug in the same way through `register_method`).

A method injects itself into the pipeline's components, says which parameters train and with which
optimizer, gets a hook before each forward and after each optimizer step, and saves/loads/exports its
adapter. The trainer knows nothing else about it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..config import SeLoRAConfig
from ..expansion.controller import ExpansionController
from ..integrations.adapter_io import export_peft_lora, load_adapter, save_adapter
from ..integrations.targets import inject_selora, selora_modules
from ..optim.selora_adamw import SeLoRAAdamW


class AdapterMethod:
    """Interface of an adapter method; see SeLoRAMethod for the reference implementation."""

    name = "base"

    def inject(self, components: Dict[str, nn.Module]) -> None:
        raise NotImplementedError

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for model in self.components.values() for p in model.parameters() if p.requires_grad]

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.trainable_parameters(), lr=lr, weight_decay=0.0)

    def attach(self, optimizer, grad_scaler=None, gradient_accumulation_steps: int = 1) -> None:
        """Called once the (possibly wrapped) optimizer exists."""

    def before_forward(self, step: int) -> None:
        """Called before the forward of every batch of optimizer step `step`."""

    def after_step(self, step: int, closure: Optional[Callable[[], torch.Tensor]] = None) -> list:
        """Called after each optimizer step; returns events worth logging (e.g. expansions)."""
        return []

    def extra_loss(self) -> Optional[torch.Tensor]:
        """A regulariser added to the diffusion loss (AdaLoRA's orthogonality term), or None."""
        return None

    def ranks(self) -> Dict[str, int]:
        return {}

    def save(self, path, extra_metadata: Optional[dict] = None) -> Path:
        raise NotImplementedError

    def load(self, path) -> dict:
        raise NotImplementedError

    def export(self, directory) -> Path:
        """A file `pipe.load_lora_weights(directory)` loads."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        """What must match between a checkpoint and the run resuming it."""
        return {"method": self.name}


class SeLoRAMethod(AdapterMethod):
    """SeLoRA: rank-1 adapters that grow where the FI-Ratio test says (ExpansionController)."""

    name = "selora"

    def __init__(self, config: SeLoRAConfig, seed: int = 0, total_steps: Optional[int] = None):
        self.config = config  # total_steps: part of the factory signature (AdaLoRA needs it), unused here
        self.seed = seed
        self.components: Dict[str, nn.Module] = {}
        self.controller: Optional[ExpansionController] = None
        self.modules = {}

    def inject(self, components: Dict[str, nn.Module]) -> None:
        self.components = dict(components)
        for prefix, model in self.components.items():
            self.modules.update(inject_selora(model, self.config, prefix=prefix))

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return SeLoRAAdamW(self.trainable_parameters(), lr=lr)

    def attach(self, optimizer, grad_scaler=None, gradient_accumulation_steps: int = 1) -> None:
        self.controller = ExpansionController(list(self.modules.values()), optimizer, self.config,
                                              grad_scaler=grad_scaler, seed=self.seed,
                                              gradient_accumulation_steps=gradient_accumulation_steps)

    def before_forward(self, step: int) -> None:
        self.controller.before_forward(step)

    def after_step(self, step: int, closure=None) -> list:
        return [d for d in self.controller.after_step(step, closure=closure) if d.expanded]

    def ranks(self) -> Dict[str, int]:
        return {name: m.rank for name, m in selora_modules(list(self.modules.values())).items()}

    def save(self, path, extra_metadata=None) -> Path:
        return save_adapter(path, list(self.modules.values()), self.config, extra_metadata)

    def load(self, path) -> dict:
        return load_adapter(path, list(self.modules.values()), self.config)

    def export(self, directory) -> Path:
        return export_peft_lora(directory, self.components)

    def state_dict(self) -> dict:
        return self.controller.state_dict() if self.controller is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state)

    def describe(self) -> dict:
        c = self.config
        return {"method": self.name, "trial": c.trial, "threshold": c.threshold, "interval": c.interval,
                "max_rank": c.max_rank, "r_init": c.r_init, "alpha": c.alpha,
                "target_modules": c.target_modules if isinstance(c.target_modules, str) else list(c.target_modules)}


METHODS: Dict[str, Callable[..., AdapterMethod]] = {"selora": SeLoRAMethod}


def register_method(name: str, factory: Callable[..., AdapterMethod]) -> None:
    """Adds a method (e.g. a LoRA baseline) under `name` for the trainer and the --method switch.

    factory(selora_config, seed=..., total_steps=...) -> AdapterMethod; total_steps is the run's number of
    optimizer steps (for schedules such as AdaLoRA's rank budget)."""
    METHODS[name] = factory
