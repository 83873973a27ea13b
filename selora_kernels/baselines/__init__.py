"""Baseline adapter methods compared with SeLoRA: LoRA (r = 4), DyLoRA (max rank 4), AdaLoRA (6 -> 4).

Each implements the trainer's method interface (see `method.py`) on SeLoRA's target layers. To make them
available to the fine-tuning program's `--method` switch, call `register_baselines()` (it adds factories to
selora_kernels.training.methods.METHODS, called as `factory(selora_config, seed=..., total_steps=...)`).
"""
from typing import Callable, Optional

from .adalora import AdaLoRAMethod
from .dylora import DyLoRALinear, DyLoRAMethod
from .lora import LoRAMethod
from .method import AdapterMethod, resolve_target_names

BASELINES = {"lora": LoRAMethod, "dylora": DyLoRAMethod, "adalora": AdaLoRAMethod}


def build_baseline(name: str, **options) -> AdapterMethod:
    """A baseline method by name ("lora", "dylora", "adalora") with its paper defaults unless overridden."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline method {name!r}; expected one of {sorted(BASELINES)}")
    return BASELINES[name](**options)


def baseline_factory(name: str, **fixed_options) -> Callable[..., AdapterMethod]:
    """A factory with the trainer's signature `factory(config, seed=0, total_steps=None, **options)`.

    `config` (a SeLoRAConfig, or None) only lends its target_modules, so a baseline adapts the layers SeLoRA
    would. total_steps is needed by AdaLoRA's rank budget schedule and ignored by the others.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline method {name!r}; expected one of {sorted(BASELINES)}")

    def factory(config=None, seed: int = 0, total_steps: Optional[int] = None, **options) -> AdapterMethod:
        merged = {**fixed_options, **options, "seed": seed}
        if config is not None and "target_modules" not in merged:
            merged["target_modules"] = getattr(config, "target_modules", "reference_code")
        if name == "adalora":
            merged.setdefault("total_steps", total_steps)
        return build_baseline(name, **merged)

    factory.__name__ = f"{name}_factory"
    return factory


def register_baselines(register: Optional[Callable[[str, Callable], None]] = None) -> None:
    """Registers lora, dylora and adalora with the trainer (training.methods.register_method by default)."""
    if register is None:
        from ..training.methods import register_method as register
    for name in BASELINES:
        register(name, baseline_factory(name))


__all__ = ["AdapterMethod", "LoRAMethod", "DyLoRAMethod", "DyLoRALinear", "AdaLoRAMethod", "BASELINES",
           "build_baseline", "baseline_factory", "register_baselines", "resolve_target_names"]
