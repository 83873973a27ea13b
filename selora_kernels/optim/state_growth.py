"""Optimizer state that belongs to capacity buffers: grow it with them, or reset it.

Supported optimizers: SeLoRAAdamW (per-slot steps), torch.optim.Adam/AdamW (one shared step per
Parameter: a grown slot then gets late bias corrections, see SeLoRAAdamW), torch.optim.SGD.
Optimizer wrappers that keep the real optimizer in `.optimizer` (accelerate) are unwrapped.
"""
from __future__ import annotations

import warnings

import torch

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
