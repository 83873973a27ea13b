"""Plain PyTorch math of the SeLoRA linear: the CPU implementation and the oracle of every kernel.

Notation (docs/algorithm.md): frozen W0 (out x in), b0; capacity buffers A (cap x in),
B (out x cap) whose first `live_rank` slots are live and the rest exactly zero; scale s; a trial slot
(row K = `trial_row` in A, a zero column in B) that exists only while Fisher is measured.

    y      = x W0^T + b0 + s (x A^T) B^T
    dx     = dy W0 + s (dy B) A
    dA     = s (dy B)^T x          dB = s dy^T (x A^T)

Per-sample Fisher: rows of the flattened input are grouped into `num_samples` equal contiguous segments
(the leading batch index of the module input). With P = dy B_ext and U = x A_ext^T over the live slots plus
the trial slot, sample i contributes dA_i = s P_i^T X_i and dB_i = s dY_i^T U_i. The backward receives
the gradient of the *batch* loss, so each per-sample gradient is `per_sample_multiplier` x its slice
(N for a mean-reduced loss, 1 for a sum).

All low-rank intermediates and every Fisher partial are kept in fp32 (float64 stays float64), whatever the
input dtype: a bf16 `x A^T` is a precision bug (docs/kernel_design.md).

Shapes never depend on the live rank: the products run over the whole capacity, so a growth within
capacity changes no shape and the output is bit-identical before and after (the new B column is zero).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from ..fisher_stats import (FISHER_COL_NONFINITE, FISHER_COL_SAMPLES, FISHER_ROW_A, FISHER_ROW_B, FISHER_ROW_COUNT,
                            fisher_dtype, statistics_shape)


def autocast_off(device_type: str):
    """Autocast stays on inside op implementations; the caller already chose the compute dtype."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the dtype itself for fp32/fp64."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tensor.to(dtype), skipping the dispatcher round trip when it is already of that dtype (hot path)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def live_slot_mask(live_rank: torch.Tensor, capacity: int, dtype: torch.dtype) -> torch.Tensor:
    """1 for slots < live_rank, 0 for dead slots; computed on the device, no host sync."""
    slots = torch.arange(capacity, device=live_rank.device)
    return (slots < live_rank).to(dtype)


# The slots are reduced in blocks whose bounds are the capacities this buffer had or would have had on its
# way here: growth past capacity goes C -> 2C + 1 (config.next_capacity), so the bounds of capacity C are
# C, (C + 1) / 2 - 1, (C + 1) / 4 - 1, ... while integers >= 1 (15: [0, 1), [1, 3), [3, 7), [7, 15); a
# user-chosen 5: [0, 2), [2, 5)). A growth then either stays inside a block (same shapes) or keeps every
# old block and adds one whose new B column is zero (adds exact zeros): the output stays bit-identical
# across every growth, at any capacity. When the live rank is known on the host (CPU), blocks with no live
# slot are skipped, so rank 1 costs a 1-wide product.


def host_live_rank(live_rank: torch.Tensor) -> Optional[int]:
    """The live rank as an int when it lives on the CPU (free to read); None on a device (no sync)."""
    return int(live_rank) if live_rank.device.type == "cpu" else None


def slot_block_bounds(capacity: int) -> list:
    """0 and the capacities of the growth chain that ends at `capacity`, ascending."""
    bounds, stop = [capacity], capacity
    while stop > 1 and (stop + 1) % 2 == 0:
        stop = (stop + 1) // 2 - 1
        bounds.append(stop)
    return [0] + sorted(b for b in bounds if b >= 1)


def _slot_blocks(capacity: int, live_rank: Optional[int]):
    if live_rank is None:
        return [(0, capacity)]
    bounds = slot_block_bounds(capacity)
    return [(start, stop) for start, stop in zip(bounds[:-1], bounds[1:]) if start < max(live_rank, 1)]


def forward_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                      live_rank: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W0^T + b0 + s (x A^T) B^T for 2-D x (M x in): the op's CPU implementation and the oracle.

    `live_rank` (0-d tensor) lets blocks of dead slots be skipped when it lives on the CPU (no sync)."""
    live = host_live_rank(live_rank) if live_rank is not None else None
    with autocast_off(x.device.type):
        acc = accumulation_dtype(x.dtype)
        y = cast(F.linear(x, weight, bias), acc)
        xa = cast(x, acc)
        for start, stop in _slot_blocks(lora_a.shape[0], live):
            low_rank = F.linear(xa, cast(lora_a[start:stop], acc))  # dead slots give exact zeros
            # a contiguous copy: the block's column stride follows the capacity, and BLAS may round differently
            y.addmm_(low_rank, cast(lora_b[:, start:stop], acc).contiguous().t(), alpha=scale)
        return cast(y, x.dtype)


def backward_reference(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       lora_a: torch.Tensor, lora_b: torch.Tensor, trial_row: Optional[torch.Tensor],
                       live_rank: torch.Tensor, scale: float, num_samples: int,
                       per_sample_multiplier: float, measuring: bool, compute_grad_x: bool):
    """Returns (grad_x, grad_a, grad_b, fisher_stats).

    The op's CPU implementation and the oracle. trial_row is read only while measuring. grad_x is an empty
    tensor when not requested; fisher_stats has the layout of fisher_stats.py, fp32 (zeros when not
    measuring). Dead slots get exactly zero gradient whatever their contents: on the CPU only the live slots
    are computed, on a device every slot is computed and the dead ones masked (no host sync).
    """
    with autocast_off(x.device.type):
        acc = accumulation_dtype(x.dtype)
        capacity = lora_a.shape[0]
        live = host_live_rank(live_rank)
        slots = capacity if live is None else min(live, capacity)
        grad_y = grad_y.contiguous()
        g = cast(grad_y, acc)
        xa = cast(x, acc)
        a = cast(lora_a[:slots], acc)
        b = cast(lora_b[:, :slots], acc)
        proj_grad = g @ b  # P = dy B, (M, slots)
        low_rank = xa @ a.t()  # U = x A^T, (M, slots)
        if live is None:
            mask = live_slot_mask(live_rank, capacity, acc)
            proj_grad.mul_(mask)
            low_rank.mul_(mask)
        grad_a = lora_a.new_zeros(lora_a.shape, dtype=acc)
        grad_b = lora_b.new_zeros(lora_b.shape, dtype=acc)
        fisher = torch.zeros(statistics_shape(capacity), dtype=fisher_dtype(x.dtype), device=x.device)
        if measuring:
            # the batch gradients are the sums of the per-sample ones: no separate dA / dB products
            per_sample_a, per_sample_b, u_ext = per_sample_gradients(g, xa, proj_grad, low_rank,
                                                                     cast(trial_row, acc), num_samples)
            torch.sum(per_sample_a, dim=0, out=grad_a[:slots]).mul_(scale)
            grad_b[:, :slots] = per_sample_b[..., :slots].sum(dim=0).mul_(scale)
            fisher_scale = (scale * per_sample_multiplier) ** 2
            fisher[FISHER_ROW_A, :slots] = per_sample_a.square().sum(dim=(0, 2)).mul_(fisher_scale)
            fisher[FISHER_ROW_B, :slots] = per_sample_b[..., :slots].square().sum(dim=(0, 1)).mul_(fisher_scale)
            fisher[FISHER_ROW_B, -1] = per_sample_b[..., -1].square().sum().mul_(fisher_scale)
            # the trial A row's Fisher stays 0: its B column is zero
            fisher[FISHER_ROW_COUNT, FISHER_COL_SAMPLES] = num_samples
            # rows of x holding inf/NaN: their trial column x . trial_row is not finite (any weight times inf or
            # NaN is); the live columns are left out so that a diverged adapter is not blamed on the input
            fisher[FISHER_ROW_COUNT, FISHER_COL_NONFINITE] = torch.isfinite(u_ext[:, -1]).logical_not().sum()
        else:
            torch.mm(proj_grad.t(), xa, out=grad_a[:slots]).mul_(scale)
            grad_b[:, :slots] = (g.t() @ low_rank).mul_(scale)
        if compute_grad_x:
            grad_x = cast(cast(F.linear(grad_y, weight.t()), acc).addmm_(proj_grad, a, alpha=scale), x.dtype)
        else:
            grad_x = x.new_empty(0)
        return grad_x, cast(grad_a, lora_a.dtype), cast(grad_b, lora_b.dtype), fisher


def per_sample_gradients(g: torch.Tensor, x: torch.Tensor, proj_grad: torch.Tensor, low_rank: torch.Tensor,
                         trial_row: torch.Tensor, num_samples: int):
    """Per-sample gradients divided by s: P_i^T X_i of the live slots (N, slots, in) and G_i^T U_i of the
    live slots plus the trial slot (N, out, slots + 1), and U_ext = x A_ext^T (M, slots + 1). Rows are split
    into `num_samples` equal segments.

    The trial slot has A row = trial_row and a zero B column: its U column is x trial_row, its P column and
    so its A-gradient are exactly zero (not computed).
    """
    rows = proj_grad.shape[0]
    if rows % num_samples:
        raise ValueError(f"{rows} input rows cannot be split into {num_samples} samples")
    tokens = rows // num_samples
    u_ext = torch.cat([low_rank, (x @ trial_row)[:, None]], dim=1)  # (M, slots + 1)
    x_s = x.reshape(num_samples, tokens, -1)
    per_sample_a = torch.bmm(proj_grad.reshape(num_samples, tokens, -1).transpose(1, 2), x_s)
    per_sample_b = torch.bmm(g.reshape(num_samples, tokens, -1).transpose(1, 2),
                             u_ext.reshape(num_samples, tokens, -1))
    return per_sample_a, per_sample_b, u_ext
