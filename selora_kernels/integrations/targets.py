"""Which linears of a model get an adapter, and the SeLoRA injection itself.

`resolve_target_names(model, target_modules, exclude_modules)` is the one place that decides which nn.Linear
modules are adapted: SeLoRA and every baseline method call it, so all adapt the same layers.
`inject_selora(model, config)` works on any nn.Module (a diffusers UNet, a transformers text encoder, a toy
MLP): the resolved nn.Linear submodules are replaced by `SeLoRALinear.from_linear` (sharing the base
weight), everything else is frozen. Targets (`config.target_modules`):

- "released_script" (old spelling "reference_code"): the released script's set. Text encoders
  (CLIPText*): every linear; anything else (the UNet): names ending in to_q, to_k, to_v, ff.net.0.proj,
  time_emb_proj.
- "all_linear": every nn.Linear.
- a list of patterns: a module matches when a pattern equals its name or its last dotted components
  (peft-style suffix), matches it as an fnmatch glob, or as a full regular expression.

`exclude_modules` (patterns of the same kinds) removes modules from that set.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Dict, Iterable, List

from torch import nn

from ..config import TARGET_PRESETS, SeLoRAConfig, canonical_mode
from ..nn.selora_linear import SeLoRALinear, selora_modules

PRESETS = TARGET_PRESETS
RELEASED_SCRIPT_UNET_SUFFIXES = ("to_q", "to_k", "to_v", "ff.net.0.proj", "time_emb_proj")


def is_text_encoder(model: nn.Module, prefix: str = "") -> bool:
    """CLIP text encoders (the released script adapts every linear of them)."""
    return type(model).__name__.startswith("CLIPText") or prefix.rstrip(".").startswith("text_encoder")


def _matches_pattern(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:  # a glob such as "*.to_q" is not a valid regex
        return False


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(_matches_pattern(name, p) for p in patterns)


def target_predicate(model: nn.Module, target_modules, prefix: str = ""):
    """A function name -> bool for the linears to adapt under `target_modules`."""
    target_modules = canonical_mode(target_modules)
    if isinstance(target_modules, str):
        if target_modules == "all_linear":
            return lambda name: True
        if target_modules == "released_script":
            if is_text_encoder(model, prefix):
                return lambda name: True
            return lambda name: matches_any(name, RELEASED_SCRIPT_UNET_SUFFIXES)
        raise ValueError(f"target_modules: unknown preset {target_modules!r}; expected one of {PRESETS} "
                         f"or a list of name patterns")
    patterns = list(target_modules)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"target_modules must be a preset {PRESETS} or a non-empty list of strings, "
                         f"got {target_modules!r}")
    return lambda name: matches_any(name, patterns)


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('.')}.{name}" if prefix else name


def resolve_target_names(model: nn.Module, target_modules="released_script", exclude_modules=(),
                         prefix: str = "") -> List[str]:
    """Names (relative to `model`, in module order) of the plain nn.Linear modules to adapt: matched by
    `target_modules` and by no pattern of `exclude_modules`, each tried on the relative name and on the name
    with `prefix` (e.g. "unet.down_blocks...."). Subclasses of nn.Linear and already-adapted layers are not
    plain nn.Linear and never match. Every adapter method resolves its layers here."""
    wanted = target_predicate(model, target_modules, prefix)
    excluded = list(exclude_modules or [])
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        qualified = _qualified(prefix, name)
        if not (wanted(name) or wanted(qualified)):
            continue
        if excluded and (matches_any(name, excluded) or matches_any(qualified, excluded)):
            continue
        names.append(name)
    return names


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Puts `module` at the dotted path `name` of `model` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_selora(model: nn.Module, config: SeLoRAConfig, prefix: str = "",
                  adapter_dtype=None) -> Dict[str, SeLoRALinear]:
    """Replaces the targeted nn.Linear submodules of `model` by SeLoRALinear; freezes everything else.

    prefix: prepended to module names (e.g. "unet", "text_encoder") in the returned dict and in each
    module's `selora_name` (which errors and adapter files use). Returns qualified name -> module.
    Already-injected SeLoRALinear modules are kept (and returned), so injecting twice is harmless.
    """
    if not isinstance(config, SeLoRAConfig):
        raise TypeError(f"inject_selora needs a SeLoRAConfig, got {type(config).__name__}")
    targets = set(resolve_target_names(model, config.target_modules, config.exclude_modules, prefix))
    excluded = list(config.exclude_modules or [])
    model.requires_grad_(False)
    injected: Dict[str, SeLoRALinear] = {}
    linear_names = []
    for name, module in list(model.named_modules()):
        qualified = _qualified(prefix, name)
        if isinstance(module, SeLoRALinear):
            injected[qualified] = module
            continue
        if type(module) is not nn.Linear:
            continue
        linear_names.append(name)
        if name not in targets:
            continue
        adapter = SeLoRALinear.from_linear(module, r_init=config.r_init, alpha=config.alpha,
                                           capacity=config.capacity, scaling=config.scaling,
                                           adapter_dtype=adapter_dtype, name=qualified)
        set_submodule(model, name, adapter)
        injected[qualified] = adapter
    if not injected:
        shown = ", ".join(linear_names[:8]) + (", ..." if len(linear_names) > 8 else "")
        raise ValueError(f"inject_selora({type(model).__name__}{f', prefix={prefix!r}' if prefix else ''}): "
                         f"target_modules={config.target_modules!r} (exclude={excluded!r}) matched none of its "
                         f"{len(linear_names)} nn.Linear modules; some of them: [{shown}]")
    for module in injected.values():
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    return injected


def live_parameter_count(modules) -> int:
    """Trainable adapter parameters at the live ranks: sum of rank x (in + out)."""
    return sum(m.rank * (m.in_features + m.out_features) for m in selora_modules(modules).values())
