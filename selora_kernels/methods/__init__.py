"""Adapter methods behind one interface (`base.AdapterMethod`): SeLoRA and the baselines it is compared with,
LoRA (r = 4), DyLoRA (max rank 4) and AdaLoRA (6 -> 4).

`METHODS` is the one registry, written out here; `make_method(name, config, seed=..., total_steps=...)` builds
one for a run. Every method adapts the layers `config` selects (target_modules, exclude_modules).
"""
from __future__ import annotations

from typing import Dict, Optional, Type

from ..config import SeLoRAConfig
from .adalora import AdaLoRAMethod
from .base import AdapterMethod
from .dylora import DyLoRALinear, DyLoRAMethod
from .lora import LoRAMethod
from .selora import SeLoRAMethod

METHODS: Dict[str, Type[AdapterMethod]] = {
    "selora": SeLoRAMethod,
    "lora": LoRAMethod,
    "dylora": DyLoRAMethod,
    "adalora": AdaLoRAMethod,
}


def make_method(name: str, config: Optional[SeLoRAConfig] = None, *, seed: int = 0,
                total_steps: Optional[int] = None, **options) -> AdapterMethod:
    """The method `name` on the layers `config` selects (default SeLoRAConfig()), with its paper defaults
    unless `options` override them. total_steps: the run's optimizer steps (AdaLoRA's budget schedule)."""
    if name not in METHODS:
        raise ValueError(f"unknown adapter method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name].from_config(config if config is not None else SeLoRAConfig(), seed=seed,
                                     total_steps=total_steps, **options)


__all__ = ["AdapterMethod", "SeLoRAMethod", "LoRAMethod", "DyLoRAMethod", "DyLoRALinear", "AdaLoRAMethod",
           "METHODS", "make_method"]
