"""Cross-process agreement for expansion decisions (torch.distributed, when initialised).

Every process measures Fisher on its own samples; summing the statistics over processes gives the Fisher
of the global batch, so every process computes the same ratios and takes the same decisions. Trial rows
are drawn from a seed shared by all processes, and `broadcast_adapters_` makes the starting point identical.
Without an initialised process group every function is a no-op.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sums `tensor` over processes in place (identity when not distributed)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def broadcast_adapters_(modules: Sequence, src: int = 0) -> None:
    """Copies A, B, trial rows and live ranks of `modules` from process `src` to all others.

    Call once after injection (before building the optimizer) when processes may have drawn different
    initial adapters. Capacities must already agree; ranks are checked first.
    """
    if not is_distributed():
        return
    check_same_ranks(modules)
    with torch.no_grad():
        for module in modules:
            for tensor in (module.lora_A, module.lora_B, module.trial_row):
                dist.broadcast(tensor.data, src=src)


def check_same_ranks(modules: Sequence) -> None:
    """Raises RuntimeError naming the first module whose rank or capacity differs between processes."""
    if not is_distributed() or not modules:
        return
    device = modules[0].lora_A.device
    local = torch.tensor([[m.rank, m.capacity] for m in modules], dtype=torch.int64, device=device)
    high, low = local.clone(), local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    differs = (high != low).any(dim=1).nonzero()
    if differs.numel():
        index = int(differs[0, 0])
        module = modules[index]
        raise RuntimeError(f"{module.selora_name}: rank/capacity differ across processes "
                           f"(this process: rank {module.rank}, capacity {module.capacity}; range over processes: "
                           f"{low[index].tolist()} .. {high[index].tolist()}); expected identical adapters")


class GrownGradientSync:
    """Averages across processes the adapter gradients of modules grown past capacity, at the end of each
    backward.

    DistributedDataParallel records every parameter's size when it is built; a parameter reallocated in place
    afterwards is silently left out of its averaging (each process keeps its own gradient, and weights and
    Adam state drift apart). The first adapter gradient of a backward queues one callback that all-reduces
    the gradients of every module with `reallocated` set, flattened into one tensor. It runs inside the
    backward, so gradient clipping and the GradScaler's overflow check see averaged gradients; where DDP
    did average a gradient, averaging identical values again changes nothing. With gradient accumulation
    each micro-batch's backward averages the running sum, which is the same mean.
    """

    def __init__(self, modules: Sequence):
        self.modules = list(modules)
        self._queued = False
        self._handles = []
        if not is_distributed():
            return
        for module in self.modules:
            for param in (module.lora_A, module.lora_B):
                self._handles.append(param.register_post_accumulate_grad_hook(self._on_gradient))

    def _on_gradient(self, param) -> None:
        if self._queued:
            return
        self._queued = True
        # runs once the whole backward is done, as DDP's own finalisation does
        torch.autograd.Variable._execution_engine.queue_callback(self.average_)

    def average_(self) -> None:
        """All-reduces (mean) the gradients of the grown modules now."""
        self._queued = False
        grads = [p.grad for m in self.modules if m.reallocated for p in (m.lora_A, m.lora_B)
                 if p.grad is not None]
        if not grads or not is_distributed():
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce_mean_(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
