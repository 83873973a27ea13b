"""Which Parameters are SeLoRA capacity buffers, their slot dimension and the live rank that owns them.

Kept outside the Parameter objects: attributes on a Parameter are lost by copy.deepcopy and a weak
reference there makes torch.save(model) fail. SeLoRALinear registers its A (slot dim 0) and B (slot dim 1)
when built, deep-copied or unpickled; optimizers (optim/) and optimizer-state growth look them up here.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

# keyed by identity: a WeakKeyDictionary would compare tensors with ==, which is elementwise
_ADAPTERS = WeakIdKeyDictionary()


def register_adapter_parameter(param: torch.Tensor, owner, slot_dim: int) -> None:
    """`owner` is any object with a `live_rank` 0-d int64 tensor (held weakly)."""
    _ADAPTERS[param] = (weakref.ref(owner), slot_dim)


def slot_dim_of(param: torch.Tensor) -> Optional[int]:
    """The slot dimension of a SeLoRA capacity buffer, or None for any other tensor."""
    entry = _ADAPTERS.get(param)
    return None if entry is None else entry[1]


def live_rank_of(param: torch.Tensor) -> torch.Tensor:
    entry = _ADAPTERS.get(param)
    owner = entry[0]() if entry is not None else None
    if owner is None:
        raise RuntimeError("no live SeLoRA module owns this parameter")
    return owner.live_rank


def owner_of(param: torch.Tensor):
    """The live module that registered `param` as a capacity buffer, or None."""
    entry = _ADAPTERS.get(param)
    return entry[0]() if entry is not None else None
