"""Fused Triton forward of the SeLoRA linear (and, mirrored, its input gradient).

Math (docs/algorithm.md), x (M x in), W0 (out x in), A (capacity x in), B (out x capacity):

    y = x W0^T + b0 + s (x A^T) B^T

One kernel, `_fused_lowrank_matmul_kernel`, computes the general form

    out = X Wt (+ bias) + s * (mask . (X R)) E        X: M x K, Wt: K x N, R: K x R_PAD, E: R_PAD x N

with X = x, Wt = W0^T, R = A^T, E = B^T. Inference needs no mask (dead slots of A and B are exact zeros, so
the live rank is not a kernel argument and a growth within capacity never recompiles); a training forward
that keeps U = x A^T for the backward masks it to the live slots (read from a device tensor). The backward's
input gradient is the same form mirrored (X = dy, Wt = W0, R = B, E = A) in selora_linear_backward.py,
which also folds the dA and dB reductions into it.

x is read once: each K step loads one X tile and feeds both the W0 dot and the R_PAD-wide rank dot into an
fp32 rank accumulator; the epilogue expands the rank accumulator with E at fp32 precision (hi/lo split for
bf16, tf32x3 for fp16, IEEE or tf32x3 for fp32 - never a plain half cast, which would round the fp32 rank
accumulator to 8 or 11 mantissa bits before the expand), scales, adds the bias and stores the output once.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch_table

TORCH_TO_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _fp32_rank_dot(low_rank, operand, acc, DOT_PRECISION: tl.constexpr):
    """acc + low_rank @ operand, where low_rank is an fp32 rank-space factor and operand has the input dtype.

    Keeps the fp32 precision of low_rank: bf16 -> hi + lo bf16 split (two bf16 dots, ~16 mantissa bits);
    fp16 -> tf32x3 on fp32 copies (an fp16 split could overflow at 65504); fp32 -> IEEE when torch asks for
    "highest", else tf32x3."""
    if operand.dtype == tl.bfloat16:
        high = low_rank.to(tl.bfloat16)
        low = (low_rank - high.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(high, operand, acc)
        acc = tl.dot(low, operand, acc)
    elif operand.dtype == tl.float16:
        acc = tl.dot(low_rank, operand.to(tl.float32), acc, input_precision="tf32x3")
    elif DOT_PRECISION == "ieee":
        acc = tl.dot(low_rank, operand, acc, input_precision="ieee")
    else:
        acc = tl.dot(low_rank, operand, acc, input_precision="tf32x3")
    return acc


@triton.jit
def _nonfinite_rows(low_rank, slots, capacity, row_ok):
    """How many rows of x hold inf/NaN, from the trial column (slot `capacity`) of the rank product
    low_rank = x A_ext^T: a non-finite entry times any weight, zero included, is inf or NaN; the live
    columns are left out so that a diverged adapter is not blamed on the input. t - t is 0 when finite,
    NaN otherwise."""
    trial_u = tl.sum(tl.where((slots == capacity)[None, :], low_rank, 0.0), axis=1)
    finite_row = (trial_u - trial_u) == 0.0
    return tl.sum(tl.where(finite_row | ~row_ok, 0.0, 1.0), axis=0)


@triton.jit
def _fused_lowrank_matmul_kernel(
        x_ptr, wt_ptr, bias_ptr, rank_in_ptr, rank_out_ptr, live_rank_ptr, low_rank_ptr, out_ptr,
        trial_ptr, nonfinite_ptr,
        rows, inner, cols, capacity, scale, col_group,
        stride_xm, stride_xk, stride_wk, stride_wn, stride_rk, stride_rr, stride_er, stride_en,
        stride_om, stride_on,
        HAS_BIAS: tl.constexpr, MASK_LIVE: tl.constexpr, EMIT_LOW_RANK: tl.constexpr, HAS_TRIAL: tl.constexpr,
        R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # out = X Wt (+ bias) + s (mask . (X R)) E ; see the module docstring. One program per (row tile, group
    # of `col_group` column tiles): the rank product X R is computed once per program, not per column tile.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(rows, BLOCK_M)
    tiles_n = tl.cdiv(cols, BLOCK_N)
    groups_n = tl.cdiv(tiles_n, col_group)
    # Grouped order: GROUP_M row tiles sweep the column groups together, so W0 tiles are reused from L2.
    programs_per_band = GROUP_M * groups_n
    band = pid // programs_per_band
    first_m = band * GROUP_M
    band_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_band) % band_rows
    pid_g = (pid % programs_per_band) // band_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    slots = tl.arange(0, R_PAD)
    row_ok = offs_m < rows
    slot_ok = slots < capacity

    # the rank product, one pass over the row tile of x (the column loop below re-reads it from L2)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    rank_in_ptrs = rank_in_ptr + offs_k[:, None] * stride_rk + slots[None, :] * stride_rr
    low_rank = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k in range(0, tl.cdiv(inner, BLOCK_K)):
        k_ok = offs_k < inner - k * BLOCK_K
        x_tile = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        rank_tile = tl.load(rank_in_ptrs, mask=k_ok[:, None] & slot_ok[None, :], other=0.0)
        if HAS_TRIAL:  # a measuring step: the trial row as slot `capacity` (its E row is zero)
            trial = tl.load(trial_ptr + k * BLOCK_K + offs_k, mask=k_ok, other=0.0)
            rank_tile = tl.where((slots == capacity)[None, :], trial[:, None], rank_tile)
        low_rank = tl.dot(x_tile, rank_tile, low_rank, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        rank_in_ptrs += BLOCK_K * stride_rk
    if MASK_LIVE:
        # Dead slots get exactly zero whatever their contents; the rank stays on the device (no sync).
        live = slots < tl.load(live_rank_ptr)
        if HAS_TRIAL:
            live = live | (slots == capacity)
        low_rank = tl.where(live[None, :], low_rank, 0.0)
    if EMIT_LOW_RANK:
        if pid_g == 0:
            tl.store(low_rank_ptr + offs_m[:, None] * R_PAD + slots[None, :], low_rank, mask=row_ok[:, None])
    if HAS_TRIAL:
        # the row tile's count of non-finite input rows, stored by the first column group (a masked store:
        # a branch here kept a stack frame)
        bad_rows = _nonfinite_rows(low_rank, slots, capacity, row_ok)
        tl.store(nonfinite_ptr + pid_m + tl.arange(0, 1), tl.full((1,), bad_rows, tl.float32), mask=pid_g == 0)
        low_rank = tl.where((slots == capacity)[None, :], 0.0, low_rank)  # never into y, even when not finite
    low_rank = low_rank * scale

    for pid_n in range(pid_g * col_group, tl.minimum(pid_g * col_group + col_group, tiles_n)):
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < cols
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        wt_ptrs = wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(inner, BLOCK_K)):
            k_ok = offs_k < inner - k * BLOCK_K
            x_tile = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt_tile = tl.load(wt_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(x_tile, wt_tile, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            wt_ptrs += BLOCK_K * stride_wk
        rank_out_ptrs = rank_out_ptr + slots[:, None] * stride_er + offs_n[None, :] * stride_en
        rank_out_tile = tl.load(rank_out_ptrs, mask=slot_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _fp32_rank_dot(low_rank, rank_out_tile, acc, DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """About two waves of programs: enough to fill the GPU, few enough to share work (rank products,
    reduction pieces) inside a program."""
    if device.type == "cuda":
        return 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few programs, so the grouped paths are exercised


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return TORCH_TO_NAME[dtype]
    except KeyError:
        raise TypeError(f"the SeLoRA Triton kernels take fp32, fp16 or bf16 tensors, got {dtype}") from None


def current_dot_precision(dtype: torch.dtype) -> str:
    return launch_table.dot_precision(dtype_name(dtype), torch.get_float32_matmul_precision())


def forward_programs(rows: int, cols: int, dtype_name_: str, device: torch.device):
    """(row tiles, column tiles per program, programs) of one forward launch."""
    blocks = launch_table.blocks_for("forward", dtype_name_, rows)
    tiles_m, tiles_n = triton.cdiv(rows, blocks.block_m), triton.cdiv(cols, blocks.block_n)
    col_group = launch_table.column_group(tiles_m, tiles_n, target_programs(device) // 2)  # one wave
    return tiles_m, col_group, tiles_m * triton.cdiv(tiles_n, col_group)


def launch_fused_lowrank_matmul(x, wt_strides, wt, bias, rank_in, rank_in_strides, rank_out, rank_out_strides,
                                live_rank, low_rank_out, out, inner, cols, capacity, scale, r_pad, trial=None,
                                nonfinite=None):
    """The forward's launcher (all strides in elements, views described by hand). trial, nonfinite: a
    measuring step's trial row (slot `capacity` of the kept U) and per-row-tile non-finite row counts."""
    rows = x.shape[0]
    name = dtype_name(x.dtype)
    blocks = launch_table.blocks_for("forward", name, rows)
    _, col_group, programs = forward_programs(rows, cols, name, x.device)
    grid = (programs,)
    _fused_lowrank_matmul_kernel[grid](
        x, wt, bias if bias is not None else out, rank_in, rank_out,
        live_rank if live_rank is not None else out, low_rank_out if low_rank_out is not None else out, out,
        trial if trial is not None else out, nonfinite if nonfinite is not None else out,
        rows, inner, cols, capacity, float(scale), col_group,
        x.stride(0), x.stride(1), wt_strides[0], wt_strides[1], rank_in_strides[0], rank_in_strides[1],
        rank_out_strides[0], rank_out_strides[1], out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, MASK_LIVE=live_rank is not None, EMIT_LOW_RANK=low_rank_out is not None,
        HAS_TRIAL=trial is not None,
        R_PAD=r_pad, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
        GROUP_M=launch_table.GROUP_M, DOT_PRECISION=current_dot_precision(x.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def selora_linear_forward_triton(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                 lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, keep=None):
    """y = x W0^T + b0 + s (x A^T) B^T for 2-D x (M x in); same contract as ops.reference.forward_reference.

    All tensors share one dtype (fp32/fp16/bf16) and device; any strides. Accumulation is fp32.

    keep: None, or what a training forward keeps for selora_linear_backward_triton (its `kept`), so the
    backward does not read x a second time; then returns (y, kept), kept None where nothing was launched.
    - `(live_rank,)`, a step that is not measuring: kept = (U,), U = (x A^T) masked to the live slots
      (M x R_PAD fp32), the rank product this kernel computes for y anyway;
    - `(live_rank, trial_row)`, a measuring step where launch_table.keeps_trial_column (half precision,
      more than SMALL_M rows): kept = (U_ext, nonfinite), U_ext with the trial column x . trial_row as
      slot `capacity` (R_PAD holding capacity + 1 slots), nonfinite the per-row-tile counts of input rows
      holding inf/NaN (fp32)."""
    rows, in_features = x2d.shape
    out_features = weight.shape[0]
    capacity = lora_a.shape[0]
    y = torch.empty(rows, out_features, dtype=x2d.dtype, device=x2d.device)
    if rows == 0 or out_features == 0 or in_features == 0:
        if in_features == 0 and rows and out_features:
            y.copy_(bias.expand_as(y)) if bias is not None else y.zero_()
        return y if keep is None else (y, None)
    if bias is not None:
        bias = bias.contiguous()  # read as a unit-stride vector
    trial = keep[1].contiguous() if keep is not None and len(keep) > 1 else None  # a unit-stride vector
    if trial is not None and not launch_table.keeps_trial_column(dtype_name(x2d.dtype), rows):
        raise ValueError(f"a measuring forward keeps the trial column for half precision and more than "
                         f"{launch_table.SMALL_M} rows only, got {x2d.dtype} and {rows} rows (forward_cuda "
                         f"keeps nothing then)")
    r_pad = launch_table.r_pad_for(max(capacity + (trial is not None), 1))
    live_rank = low_rank = nonfinite = None
    if keep is not None:
        live_rank = keep[0].reshape(1)
        low_rank = torch.empty(rows, r_pad, dtype=torch.float32, device=x2d.device)
        if trial is not None:
            tiles_m = forward_programs(rows, out_features, dtype_name(x2d.dtype), x2d.device)[0]
            nonfinite = torch.empty(tiles_m, dtype=torch.float32, device=x2d.device)
    launch_fused_lowrank_matmul(
        x2d, (weight.stride(1), weight.stride(0)), weight, bias,
        lora_a, (lora_a.stride(1), lora_a.stride(0)), lora_b, (lora_b.stride(1), lora_b.stride(0)),
        live_rank, low_rank, y, in_features, out_features, capacity, scale, r_pad, trial, nonfinite)
    if keep is None:
        return y
    return y, ((low_rank,) if trial is None else (low_rank, nonfinite))
