"""Batched expansion of many SeLoRALinear modules: one extension call for the slot writes, one per
capacity class for growth past capacity (parameters, their gradients and optimizer state together)."""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch

from ..config import next_capacity
from ..nn.selora_linear import SeLoRALinear
from ..ops.capacity import expand_slots_, grow_capacity_
from ..optim.state_growth import (SUPPORTED_OPTIMIZERS, check_supported, optimizers_holding_state,
                                   reset_state_, state_tensors)


def _fresh_seed() -> int:
    """A seed drawn from torch's global generator, so torch.manual_seed makes expansions reproducible."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _unpassed_optimizers(modules: Sequence[SeLoRALinear], optimizer) -> list:
    """Optimizers other than `optimizer` that hold state of these modules' buffers (found through the
    registry of optim/state_growth.py): their state must grow too, or their next step() fails on the
    old shape. ValueError, before anything changes, for one whose state layout is unknown."""
    holders = optimizers_holding_state([p for m in modules for p in (m.lora_A, m.lora_B)], exclude=optimizer)
    for holder in holders:
        try:
            check_supported(holder)
        except TypeError as error:
            names = ", ".join(m.selora_name for m in modules
                              if holder.state.get(m.lora_A) or holder.state.get(m.lora_B))
            raise ValueError(
                f"growing {names} past capacity: optimizer {type(holder).__name__} holds state for its adapter "
                f"parameters of the old shape, which its next step() would fail on, and that state cannot grow "
                f"with them (supported optimizers: {SUPPORTED_OPTIMIZERS}); train with a supported optimizer "
                f"(then pass it as optimizer=), or drop its state of these parameters before expanding") from error
    return holders


def grow_modules_(modules: Sequence[SeLoRALinear], new_capacity: int, optimizer=None,
                  backend: str = "auto") -> None:
    """Grows the capacity of `modules` in place to `new_capacity`: A, B, their .grad and optimizer state.

    The state of `optimizer` grows, and so does that of every other optimizer known to hold state of
    these buffers (torch.optim optimizers that stepped, SeLoRAAdamW after load_state_dict: see
    optim/state_growth.py), so forgetting optimizer= no longer breaks their next step()."""
    optimizers = ([optimizer] if optimizer is not None else []) + _unpassed_optimizers(modules, optimizer)
    tensors, dims, seen = [], [], set()

    def add(tensor, dim):
        if id(tensor) not in seen:  # once per tensor, even where optimizers share a state tensor
            seen.add(id(tensor))
            tensors.append(tensor)
            dims.append(dim)

    for module in modules:
        for param, dim in ((module.lora_A, 0), (module.lora_B, 1)):
            add(param, dim)
            if param.grad is not None:
                add(param.grad, dim)
            for holder in optimizers:
                for state_tensor, state_dim in state_tensors(holder, param):
                    add(state_tensor, state_dim)
    grow_capacity_(tensors, dims, new_capacity, backend=backend)
    for module in modules:
        module.reallocated = True
        module.reset_measuring()  # the statistics' width follows the capacity: measuring restarts


def expand_modules(modules: Sequence[SeLoRALinear], optimizer=None, seed: Optional[int] = None,
                   reset_optimizer_state: bool = False, backend: str = "auto") -> None:
    """Expands every module by one slot: trial row adopted as row `rank` of A, zero column of B, next
    trial rows drawn from one generator seeded with `seed` (Kaiming-uniform, in list order).

    optimizer: its state grows with buffers grown past capacity; the state of other optimizers known to
    hold these buffers grows too (grow_modules_), so a forgotten optimizer= cannot break their next step.
    reset_optimizer_state: zero the whole optimizer state of these modules (the released script's rule).
    """
    modules = list(modules)
    if not modules:
        return
    for module in modules:
        if not isinstance(module, SeLoRALinear):
            raise TypeError(f"expand_modules takes SeLoRALinear modules, got {type(module).__name__}")
    if len({id(m) for m in modules}) != len(modules):
        raise ValueError("expand_modules got the same module twice")
    if optimizer is not None:
        check_supported(optimizer)
    full = defaultdict(list)
    for module in modules:
        if module.rank >= module.capacity:
            full[next_capacity(module.capacity)].append(module)
    if full:  # every check before the first buffer grows
        _unpassed_optimizers([m for group in full.values() for m in group], optimizer)
    for new_capacity, group in full.items():
        grow_modules_(group, new_capacity, optimizer, backend=backend)
    ranks = [m.rank for m in modules]
    old_scales = [m.scale for m in modules]
    expand_slots_([m.lora_A for m in modules], [m.lora_B for m in modules], [m.trial_row for m in modules],
                  [m.live_rank for m in modules], ranks, _fresh_seed() if seed is None else seed,
                  backend=backend)
    for module, rank, old_scale in zip(modules, ranks, old_scales):
        module.set_live_rank(rank + 1, device_written=True)
        if module.scaling == "alpha_over_r":
            module.scale = module.alpha / module.rank
            with torch.no_grad():
                module.lora_B.mul_(old_scale / module.scale)
    if reset_optimizer_state and optimizer is not None:
        reset_state_(optimizer, [p for m in modules for p in (m.lora_A, m.lora_B)])
