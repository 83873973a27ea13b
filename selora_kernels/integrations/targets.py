"""Which linears of a model get an adapter, and the SeLoRA injection itself.

`resolve_target_names(model, target_modules, exclude_modules)` is the one place that decides which nn.Linear
modules are adapted: SeLoRA and every baseline method call it, so all adapt the same layers.
SeLoRA's injection (integrations/peft_method.py) replaces the resolved nn.Linear submodules of any nn.Module
(a diffusers UNet, a transformers text encoder, a toy MLP). Targets (`target_modules`):

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
from typing import Iterable, List

from torch import nn

from ..config import TARGET_PRESETS, canonical_mode
from ..nn.selora_linear import selora_modules

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


def qualified_name(prefix: str, name: str) -> str:
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
        qualified = qualified_name(prefix, name)
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


def live_parameter_count(modules) -> int:
    """Trainable adapter parameters at the live ranks: sum of rank x (in + out)."""
    return sum(m.rank * (m.in_features + m.out_features) for m in selora_modules(modules).values())
