"""Optimizer state that belongs to capacity buffers: grow it with them, or reset it.

Supported optimizers: SeLoRAAdamW (per-slot steps), torch.optim.Adam/AdamW (one shared step per
Parameter: a grown slot then gets late bias corrections, see SeLoRAAdamW), torch.optim.SGD.
Optimizer wrappers that keep the real optimizer in `.optimizer` (accelerate) are unwrapped.

Optimizers nobody passed: growing a buffer past capacity without growing the optimizer state of that
buffer leaves moments of the old shape, and the next `step()` fails deep inside torch.optim. A
Parameter does not know which optimizers hold it, so this module keeps a weak registry of them: a
global step pre-hook (torch.optim.optimizer.register_optimizer_step_pre_hook, run by every
torch.optim.Optimizer subclass) records each optimizer whose param_groups contain a capacity buffer,
and SeLoRAAdamW.load_state_dict records itself (SeLoRAAdamW._loaded_state). State only comes into
being in step() or load_state_dict(), so every optimizer holding state of a capacity buffer is found,
except a torch optimizer whose state was loaded and that has not stepped since, or one whose step
only ever ran inside torch.compile. The registry holds weak references: it keeps no optimizer alive.
`optimizers_holding_state` answers from it; expansion/growth.py grows the state of those optimizers
together with the buffers, or raises a ValueError for one whose state layout is unknown.
"""
from __future__ import annotations

import warnings
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..nn.slots import slot_dim_of
from .selora_adamw import SeLoRAAdamW

SUPPORTED_OPTIMIZERS = "SeLoRAAdamW, torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD"
_MOMENT_KEYS = {
    SeLoRAAdamW: ("exp_avg", "exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.SGD: ("momentum_buffer",),
}
_warned_shared_step = False


def unwrap_optimizer(optimizer):
    """The innermost torch optimizer behind wrappers such as accelerate's AcceleratedOptimizer."""
    while not type(optimizer) in _MOMENT_KEYS and isinstance(getattr(optimizer, "optimizer", None),
                                                             torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _moment_keys(optimizer):
    for cls in type(optimizer).__mro__:
        if cls in _MOMENT_KEYS:
            return _MOMENT_KEYS[cls]
    raise TypeError(f"cannot grow or reset the state of optimizer {type(optimizer).__name__}: "
                    f"supported are {SUPPORTED_OPTIMIZERS}")


def check_supported(optimizer) -> None:
    """Raises TypeError for an optimizer whose state layout is unknown; warns (once) about the shared
    step counter of torch's Adam/AdamW, which gives grown slots late bias corrections."""
    optimizer = unwrap_optimizer(optimizer)
    _moment_keys(optimizer)
    global _warned_shared_step
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and not _warned_shared_step:
        _warned_shared_step = True
        warnings.warn("expanding SeLoRA modules under torch's Adam/AdamW: new slots share the Parameter's step "
                      "counter and get late bias corrections (3-6x larger first updates); use "
                      "selora_kernels.SeLoRAAdamW for per-slot step counters", stacklevel=3)


def state_tensors(optimizer, param):
    """(tensor, slot_dim) pairs of the optimizer state of one capacity buffer."""
    optimizer = unwrap_optimizer(optimizer)
    keys = _moment_keys(optimizer)
    state = optimizer.state.get(param, {})
    dim = slot_dim_of(param)
    if dim is None:
        raise ValueError("state_tensors: the parameter is not a registered SeLoRA capacity buffer")
    pairs = [(state[key], dim) for key in keys if isinstance(state.get(key), torch.Tensor)]
    if "slot_steps" in state:
        pairs.append((state["slot_steps"], 0))
    return pairs


def reset_state_(optimizer, params) -> None:
    """Zeroes the whole state of `params` (the released script's whole-layer Adam reset)."""
    optimizer = unwrap_optimizer(optimizer)
    _moment_keys(optimizer)
    for param in params:
        state = optimizer.state.get(param)
        if state:
            optimizer.state[param] = {}


# ---------------------------------------------------------------------------------------------------
# registry of the optimizers that hold capacity buffers (module docstring says why)
# ---------------------------------------------------------------------------------------------------
_HOLDERS = weakref.WeakSet()  # optimizers whose param_groups contain a capacity buffer
_SCANNED = weakref.WeakKeyDictionary()  # optimizer -> its parameter count when last scanned


def track_optimizer(optimizer) -> None:
    """Records (weakly) `optimizer` when its param_groups contain a SeLoRA capacity buffer.

    Cheap enough for every step: an optimizer already recorded returns at once, and one without
    capacity buffers is scanned again only when its parameter count changes (add_param_group)."""
    optimizer = unwrap_optimizer(optimizer)
    if optimizer in _HOLDERS:
        return
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    if _SCANNED.get(optimizer) == count:
        return
    _SCANNED[optimizer] = count
    if any(slot_dim_of(p) is not None for group in optimizer.param_groups for p in group["params"]):
        _HOLDERS.add(optimizer)


def _track_before_step(optimizer, args, kwargs) -> None:
    if torch.compiler.is_compiling():  # a registry update is no graph op; eager steps record it
        return
    track_optimizer(optimizer)


register_optimizer_step_pre_hook(_track_before_step)


def optimizers_holding_state(params, exclude=None) -> list:
    """Recorded optimizers (unwrapped, `exclude` left out) with state for any of `params`."""
    exclude = unwrap_optimizer(exclude) if exclude is not None else None
    holders = []
    for optimizer in set(_HOLDERS) | set(SeLoRAAdamW._loaded_state):
        if optimizer is exclude:
            continue
        # .get: optimizer.state is a defaultdict, a lookup with [] would insert an empty entry
        if any(optimizer.state.get(param) for param in params):
            holders.append(optimizer)
    return holders
