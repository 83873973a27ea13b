"""Fused Triton backward of the SeLoRA linear, with the per-sample Fisher folded into the dA/dB reduction.

Math (docs/algorithm.md, ops/reference.py), mask_k = [k < live_rank] read from a device tensor:

    P  = (dy B) . mask                      U = (x A^T) . mask        (M x R_PAD, fp32)
    dx = dy W0 + s P A
    dA = s P^T x                            dB = s dy^T U
    Fisher (measuring): rows grouped into N equal contiguous samples i; with the trial slot K = capacity
    (A row = trial_row, B column = 0, so P[:, K] = 0 and U[:, K] = x trial_row) and c = s * multiplier,
        fisher_a[k] = sum_i || c P_i[:, k]^T X_i ||^2      fisher_b[k] = sum_i || c dY_i^T U_i[:, k] ||^2

Launches (all deterministic: fixed-order reductions, no atomics):
  1. `_shrink_kernel`: U = x A_ext^T, where A_ext appends the trial row as slot `capacity` while measuring,
     with each program's count of non-finite input rows. Skipped when a training forward that was not
     measuring kept U (`kept`, selora_linear_forward.py): then the backward reads x once.
  2. grad_x: the forward kernel mirrored (selora_linear_forward.py) emits P and, from its first column
     tile, dB's per-sample partials U^T dy per row tile; without grad_x, `_shrink_kernel` computes P = dy B
     and emits the same partials. dy is read by this launch only.
  3. `_segment_reduce_kernel` (P, x) -> dA: the token reduction split at sample boundaries and into chunks
     inside a sample, each chunk writing an fp32 partial R_PAD x in.
  4. `_finalize_grad_and_fisher_kernel` twice (dA's chunks, dB's row tiles): per (depth tile, slot) sums
     each sample's pieces (32 per load), adds the sum into the gradient and, when FISHER, squares
     (c g_i)^2 into an fp32 per-tile sum. Not measuring, dA's also zeroes the statistics tensor (no fill
     launch). (One launch for both gradients, branching on the program id, was tried: its two branches
     compiled with separate pipeline buffers, twice the shared memory, and a stack frame under triton 3.6.)
  5. While measuring, `_fisher_collect_kernel` sums the per-tile Fisher sums in tile order and the
     non-finite row counts, and writes the whole statistics tensor (layout: selora_kernels/fisher_stats.py):
     one launch instead of five small torch ops.
  4 launches not measuring when the forward kept U, 5 otherwise; 6 measuring.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..fisher_stats import (FISHER_COL_NONFINITE, FISHER_COL_SAMPLES, FISHER_ROW_A, FISHER_ROW_B,
                            FISHER_ROW_COUNT, statistics_shape, statistics_width)
from . import launch_table
from .selora_linear_forward import (_fp32_rank_dot, _store_rank_partials, current_dot_precision, dtype_name,
                                    launch_fused_lowrank_matmul)

# The statistics layout as compile-time constants of _fisher_collect_kernel (jit functions read only
# constexpr globals).
_ROW_A = tl.constexpr(FISHER_ROW_A)
_ROW_B = tl.constexpr(FISHER_ROW_B)
_ROW_COUNT = tl.constexpr(FISHER_ROW_COUNT)
_COL_SAMPLES = tl.constexpr(FISHER_COL_SAMPLES)
_COL_NONFINITE = tl.constexpr(FISHER_COL_NONFINITE)


@triton.jit
def _shrink_kernel(x_ptr, slot_rows_ptr, trial_row_ptr, live_rank_ptr, out_ptr, nonfinite_ptr, u_ptr,
                   partial_ptr, rows, depth, capacity, segment_rows,
                   stride_xm, stride_xd, stride_sr, stride_sd,
                   HAS_TRIAL: tl.constexpr, EMIT_RANK_PARTIAL: tl.constexpr, R_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # out[m, k] = mask_k * sum_d X[m, d] S[k, d]; S = slot rows (k < capacity) + trial row (k = capacity).
    # P = dy B without grad_x (EMIT_RANK_PARTIAL) also emits dB's partials U^T dy from the same dy tiles.
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    slots = tl.arange(0, R_PAD)
    row_ok = offs_m < rows
    slot_ok = slots < capacity
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xd
    slot_ptrs = slot_rows_ptr + offs_k[:, None] * stride_sd + slots[None, :] * stride_sr
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k in range(0, tl.cdiv(depth, BLOCK_K)):
        k_ok = offs_k < depth - k * BLOCK_K
        x_tile = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        slot_tile = tl.load(slot_ptrs, mask=k_ok[:, None] & slot_ok[None, :], other=0.0)
        if HAS_TRIAL:
            trial = tl.load(trial_row_ptr + k * BLOCK_K + offs_k, mask=k_ok, other=0.0)
            slot_tile = tl.where((slots == capacity)[None, :], trial[:, None], slot_tile)
        acc = tl.dot(x_tile, slot_tile, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        slot_ptrs += BLOCK_K * stride_sd
    live = slots < tl.load(live_rank_ptr)
    if HAS_TRIAL:
        live = live | (slots == capacity)
    acc = tl.where(live[None, :], acc, 0.0)
    tl.store(out_ptr + offs_m[:, None] * R_PAD + slots[None, :], acc, mask=row_ok[:, None])
    if EMIT_RANK_PARTIAL:
        # a second pass over this row tile of dy (from L2): inside the main loop it spilled at R_PAD 32
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xd
        for k in range(0, tl.cdiv(depth, BLOCK_K)):
            k_ok = offs_k < depth - k * BLOCK_K
            x_tile = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            _store_rank_partials(u_ptr, x_tile, partial_ptr, pid, offs_m, row_ok, k * BLOCK_K + offs_k, k_ok,
                                 rows, segment_rows, depth, R_PAD, BLOCK_M, DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xd
    if HAS_TRIAL:
        # measuring: count the rows of x holding inf/NaN. Their trial column x . trial_row is not finite (a
        # non-finite entry times any weight, zero included, is inf or NaN); the live columns are left out so
        # that a diverged adapter is not blamed on the input. t - t is 0 when finite, NaN otherwise.
        trial_u = tl.sum(tl.where((slots == capacity)[None, :], acc, 0.0), axis=1)
        finite_row = (trial_u - trial_u) == 0.0
        tl.store(nonfinite_ptr + pid, tl.sum(tl.where(finite_row | ~row_ok, 0.0, 1.0), axis=0))


@triton.jit
def _segment_reduce_kernel(low_rank_ptr, x_ptr, partial_ptr,
                           segment_rows, chunk_rows, chunks, depth,
                           stride_xm, stride_xd,
                           R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    # partial[i * chunks + c, k, n] = sum over the tokens t of chunk c of sample i of L[t, k] X[t, n]
    pid_chunk = tl.program_id(0)
    pid_n = tl.program_id(1)
    segment = pid_chunk // chunks
    start = segment * segment_rows + (pid_chunk % chunks) * chunk_rows
    end = tl.minimum(start + chunk_rows, (segment + 1) * segment_rows)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    slots = tl.arange(0, R_PAD)
    col_ok = offs_n < depth
    acc = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
    for t in range(start, end, BLOCK_T):
        tokens = t + offs_t
        token_ok = tokens < end
        # L^T tile (R_PAD x BLOCK_T), read transposed from the row-major M x R_PAD workspace
        low_rank_t = tl.load(low_rank_ptr + tokens[None, :] * R_PAD + slots[:, None], mask=token_ok[None, :],
                             other=0.0)
        x_tile = tl.load(x_ptr + tokens[:, None] * stride_xm + offs_n[None, :] * stride_xd,
                         mask=token_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _fp32_rank_dot(low_rank_t, x_tile, acc, DOT_PRECISION)
    tl.store(partial_ptr + (pid_chunk * R_PAD + slots[:, None]) * depth + offs_n[None, :], acc,
             mask=col_ok[None, :])


@triton.jit
def _finalize_grad_and_fisher_kernel(partial_ptr, grad_ptr, fisher_ptr,
                     segments, chunks, segment_rows, piece_rows, depth, capacity, scale, fisher_factor,
                     zero_count, stride_gr, stride_gd,
                     FISHER: tl.constexpr, ROW_TILES: tl.constexpr, R_PAD: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program per (depth tile, slot k). g_i = sum of sample i's pieces (its gradient / s);
    # grad[k] = s sum_i g_i; fisher tile[k] = sum_i sum_n (c g_i)^2. Pieces of sample i: chunks i*chunks ..
    # (dA, segment reduction), or with ROW_TILES the row tiles of piece_rows rows touching it, each at
    # index tile + i (dB, emitted by the dy pass).
    pid_n = tl.program_id(0)
    slot = tl.program_id(1)
    if not FISHER:
        # not measuring: one program zeroes the first zero_count entries of the statistics tensor
        # (fisher_ptr), which saves the fill launch of a torch.zeros
        if pid_n == 0 and slot == 0:
            for start in range(0, zero_count, BLOCK_N):
                offs = start + tl.arange(0, BLOCK_N)
                tl.store(fisher_ptr + offs, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=offs < zero_count)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    col_ok = offs_n < depth
    grad = tl.zeros((BLOCK_N,), dtype=tl.float32)
    fisher = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for segment in range(0, segments):
        if ROW_TILES:
            first = (segment * segment_rows) // piece_rows + segment
            end = (segment * segment_rows + segment_rows - 1) // piece_rows + segment + 1
        else:
            first = segment * chunks
            end = first + chunks
        # BLOCK_P pieces per load, summed in a fixed tree: latency of cdiv(pieces, BLOCK_P) loads, not pieces
        block = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for start in range(first, end, BLOCK_P):
            pieces = start + offs_p
            block += tl.load(partial_ptr + (pieces[:, None] * R_PAD + slot) * depth + offs_n[None, :],
                             mask=(pieces < end)[:, None] & col_ok[None, :], other=0.0)
        sample_grad = tl.sum(block, axis=0)
        grad += sample_grad
        if FISHER:
            sample_grad = sample_grad * fisher_factor
            fisher += sample_grad * sample_grad
    tl.store(grad_ptr + slot * stride_gr + offs_n * stride_gd, (grad * scale).to(grad_ptr.dtype.element_ty),
             mask=col_ok & (slot < capacity))
    if FISHER:
        tl.store(fisher_ptr + pid_n * R_PAD + slot, tl.sum(fisher, axis=0))


@triton.jit
def _fisher_collect_kernel(tiles_a_ptr, tiles_b_ptr, nonfinite_ptr, fisher_ptr, num_tiles_a, num_tiles_b,
                           num_shrink_programs, width, sample_count,
                           R_PAD: tl.constexpr, BLOCK: tl.constexpr):
    # row A = sum over dA tiles, row B = over dB tiles (fixed order),
    # count row = (N, non-finite input rows = sum of the shrink programs' counts, 0, ..., 0)
    offs = tl.arange(0, BLOCK)
    nonfinite = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, num_shrink_programs, BLOCK):
        nonfinite += tl.load(nonfinite_ptr + start + offs, mask=start + offs < num_shrink_programs, other=0.0)
    bad_rows = tl.sum(nonfinite, axis=0)
    slots = tl.arange(0, R_PAD)
    in_row = slots < width
    fisher_a = tl.zeros((R_PAD,), dtype=tl.float32)
    for tile in range(0, num_tiles_a):
        fisher_a += tl.load(tiles_a_ptr + tile * R_PAD + slots)
    fisher_b = tl.zeros((R_PAD,), dtype=tl.float32)
    for tile in range(0, num_tiles_b):
        fisher_b += tl.load(tiles_b_ptr + tile * R_PAD + slots)
    tl.store(fisher_ptr + _ROW_A * width + slots, fisher_a, mask=in_row)
    tl.store(fisher_ptr + _ROW_B * width + slots, fisher_b, mask=in_row)
    count_row = tl.where(slots == _COL_SAMPLES, sample_count, tl.where(slots == _COL_NONFINITE, bad_rows, 0.0))
    tl.store(fisher_ptr + _ROW_COUNT * width + slots, count_row, mask=in_row)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """About two waves of programs: enough chunks to fill the GPU, few enough to keep partials small."""
    if device.type == "cuda":
        return 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few chunks so the chunked path is exercised


class _Workspace:
    """The backward's fp32 scratch (P, U, non-finite counts, chunk partials, Fisher tiles) as views of one
    allocation: one caching-allocator call per backward instead of six. Every view starts on a 16-byte
    boundary, the pointer alignment the kernels are compiled for."""

    def __init__(self, device: torch.device, shapes: dict):
        self.shapes, self.offsets, total = shapes, {}, 0
        for name, shape in shapes.items():
            self.offsets[name] = total
            total += -(-math.prod(shape) // 4) * 4
        self.buffer = torch.empty(total, dtype=torch.float32, device=device)

    def __getitem__(self, name: str) -> torch.Tensor:
        start, shape = self.offsets[name], self.shapes[name]
        return self.buffer[start:start + math.prod(shape)].view(shape)


def _shrink_programs(x) -> int:
    """Programs of one `_shrink` launch over x: the length of its non-finite row counts."""
    return triton.cdiv(x.shape[0], launch_table.blocks_for("shrink", dtype_name(x.dtype)).block_m)


def _shrink(x, slot_rows, slot_strides, trial_row, live_rank, out, nonfinite, capacity, r_pad, rank_partials=None):
    """out = (x S^T) . mask; with a trial row, also each program's count of non-finite rows (fp32).
    rank_partials: None, or (U, partial buffer, rows per sample) to emit dB's partials U^T x as well."""
    rows, depth = x.shape
    blocks = launch_table.blocks_for("shrink", dtype_name(x.dtype))
    u, partial, segment_rows = rank_partials if rank_partials is not None else (out, out, 1)
    _shrink_kernel[(_shrink_programs(x),)](
        x, slot_rows, trial_row if trial_row is not None else slot_rows, live_rank, out,
        nonfinite if trial_row is not None else out, u, partial,
        rows, depth, capacity, segment_rows, x.stride(0), x.stride(1), slot_strides[0], slot_strides[1],
        HAS_TRIAL=trial_row is not None, EMIT_RANK_PARTIAL=rank_partials is not None, R_PAD=r_pad,
        BLOCK_M=blocks.block_m, BLOCK_K=blocks.block_k, DOT_PRECISION=current_dot_precision(x.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def dy_pass_row_tile(rows: int, dtype_name_: str, compute_grad_x: bool) -> int:
    """Rows per dB partial: the row tile of the kernel that reads dy (grad_x, or the shrink of P)."""
    kernel = "grad_x" if compute_grad_x else "shrink"
    return launch_table.blocks_for(kernel, dtype_name_, rows).block_m


class _ReducePlan:
    """Where dA's and dB's per-sample partials come from and how the finalize launches sum them.

    dA: the segment reduction over (P, x), chunks inside each sample (about `target_programs` programs).
    dB: one partial per (row tile of the dy pass, sample it touches), emitted by grad_x or the shrink of P:
    tiles + samples - 1 pieces at most."""

    def __init__(self, rows, depth_a, depth_b, dtype_name_, segments, r_pad, target_programs, compute_grad_x):
        self.blocks = launch_table.blocks_for("segment_reduce", dtype_name_)
        self.final = launch_table.blocks_for("finalize", dtype_name_)
        self.segment_rows = rows // segments
        self.tiles_a = triton.cdiv(depth_a, self.blocks.block_n)
        self.chunks, self.chunk_rows = launch_table.segment_chunks(self.segment_rows, segments, self.tiles_a,
                                                                   self.blocks, target_programs)
        self.row_tile_b = dy_pass_row_tile(rows, dtype_name_, compute_grad_x)
        self.final_tiles = (triton.cdiv(depth_a, self.final.block_n), triton.cdiv(depth_b, self.final.block_n))
        self.partial_shapes = ((segments * self.chunks, r_pad, depth_a),
                               (triton.cdiv(rows, self.row_tile_b) + segments - 1, r_pad, depth_b))


def _finalize(plan, which, partial, grad, grad_strides, fisher_tiles, capacity, r_pad, scale, segments,
              fisher_factor, measuring, zero_stats=None):
    """grad (written in place through grad_strides) = s * the sum of the partials; `which` is 0 for dA,
    1 for dB. Per-tile Fisher sums go to fisher_tiles while measuring; otherwise `zero_stats`, when given,
    is the statistics tensor this launch zeroes."""
    depth = partial.shape[2]
    slots = min(capacity + int(measuring), r_pad)  # the trial slot's Fisher while measuring
    _finalize_grad_and_fisher_kernel[(plan.final_tiles[which], slots)](
        partial, grad, fisher_tiles if measuring else (zero_stats if zero_stats is not None else partial),
        segments, plan.chunks, plan.segment_rows, plan.row_tile_b, depth, capacity, float(scale),
        float(fisher_factor), 0 if measuring or zero_stats is None else zero_stats.numel(),
        grad_strides[0], grad_strides[1],
        FISHER=measuring, ROW_TILES=which == 1, R_PAD=r_pad, BLOCK_P=plan.final.block_m,
        BLOCK_N=plan.final.block_n, num_warps=plan.final.num_warps, num_stages=plan.final.num_stages)


def selora_linear_backward_triton(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale: float,
                                  num_samples: int, per_sample_multiplier: float, measuring: bool,
                                  compute_grad_x: bool, kept=None):
    """(grad_x, grad_a, grad_b, fisher): exactly the contract of ops.reference.backward_reference.

    x, grad_y: 2-D (M x in, M x out), any strides, one dtype (fp32/fp16/bf16) shared with weight, lora_a,
    lora_b and trial_row; live_rank: a 0-d integer device tensor (never read on the host). fisher is
    fp32 in the layout of fisher_stats, zeros when not measuring. kept: what a training forward that was
    not measuring kept (selora_linear_forward_triton's `keep`): (U,), so the shrink of U (a second read of
    x) is skipped; None computes U here."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    capacity = lora_a.shape[0]
    device = x.device
    if measuring and rows % num_samples:
        raise ValueError(f"{rows} input rows cannot be split into {num_samples} samples")
    # No fill launch: measuring, _fisher_collect_kernel writes every entry; not measuring, dA's finalize
    # launch zeroes it. Empty inputs launch nothing and take torch.zeros.
    allocate = torch.empty if rows and in_features and out_features else torch.zeros
    fisher = allocate(statistics_shape(capacity), dtype=torch.float32, device=device)
    grad_x = torch.empty(rows, in_features, dtype=x.dtype, device=device) if compute_grad_x else x.new_empty(0)
    grad_a = torch.empty(capacity, in_features, dtype=lora_a.dtype, device=device)
    grad_b = torch.empty(out_features, capacity, dtype=lora_b.dtype, device=device)
    if rows == 0 or in_features == 0 or out_features == 0:
        grad_a.zero_()
        grad_b.zero_()
        if compute_grad_x:
            grad_x.zero_()
        if measuring:
            fisher[FISHER_ROW_COUNT, FISHER_COL_SAMPLES] = num_samples
        return grad_x, grad_a, grad_b, fisher
    r_pad = launch_table.r_pad_for(statistics_width(capacity, measuring))
    live_rank = live_rank.reshape(1)

    segments = num_samples if measuring else 1
    plan = _ReducePlan(rows, in_features, out_features, dtype_name(x.dtype), segments, r_pad,
                       _target_programs(device), compute_grad_x)
    if kept is not None and (measuring or kept[0].shape != (rows, r_pad)):
        raise ValueError(f"the kept forward tensors do not match this backward (U {tuple(kept[0].shape)}, "
                         f"expected {(rows, r_pad)}, and none while measuring; measuring={measuring})")
    final_a, final_b = plan.final_tiles
    shrink_programs = _shrink_programs(x)
    work = _Workspace(device, {
        "proj_grad": (rows, r_pad),  # P = (dy B) . mask
        **({"low_rank": (rows, r_pad)} if kept is None else {}),  # U = (x A_ext^T) . mask
        "partial_a": plan.partial_shapes[0], "partial_b": plan.partial_shapes[1],
        **({"nonfinite": (shrink_programs,)} if measuring and kept is None else {}),
        **({"fisher_a": (final_a, r_pad), "fisher_b": (final_b, r_pad)} if measuring else {}),
    })
    proj_grad = work["proj_grad"]
    nonfinite = None
    if kept is not None:
        low_rank, = kept
    else:
        # x pass: U first, so the dy pass can emit dB's partials from the dy tiles it loads anyway
        low_rank, nonfinite = work["low_rank"], work["nonfinite"] if measuring else None
        trial = trial_row.contiguous() if measuring else None  # read as a unit-stride vector
        _shrink(x, lora_a, (lora_a.stride(0), lora_a.stride(1)), trial, live_rank, low_rank, nonfinite, capacity,
                r_pad)
    rank_partials = (low_rank, work["partial_b"], plan.segment_rows)
    if compute_grad_x:
        launch_fused_lowrank_matmul(
            "grad_x", grad_y, (weight.stride(0), weight.stride(1)), weight, None,
            lora_b, (lora_b.stride(0), lora_b.stride(1)), lora_a, (lora_a.stride(0), lora_a.stride(1)),
            live_rank, proj_grad, grad_x, out_features, in_features, capacity, scale, r_pad, rank_partials)
    else:
        _shrink(grad_y, lora_b, (lora_b.stride(1), lora_b.stride(0)), None, live_rank, proj_grad, None, capacity,
                r_pad, rank_partials)
    blocks = plan.blocks
    _segment_reduce_kernel[(segments * plan.chunks, plan.tiles_a)](
        proj_grad, x, work["partial_a"], plan.segment_rows, plan.chunk_rows, plan.chunks, in_features,
        x.stride(0), x.stride(1), R_PAD=r_pad, BLOCK_N=blocks.block_n, BLOCK_T=blocks.block_k,
        DOT_PRECISION=current_dot_precision(x.dtype), num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    fisher_factor = scale * per_sample_multiplier
    fisher_a, fisher_b = (work["fisher_a"], work["fisher_b"]) if measuring else (None, None)
    _finalize(plan, 0, work["partial_a"], grad_a, (grad_a.stride(0), grad_a.stride(1)), fisher_a, capacity, r_pad,
              scale, segments, fisher_factor, measuring, zero_stats=fisher)
    _finalize(plan, 1, work["partial_b"], grad_b, (grad_b.stride(1), grad_b.stride(0)), fisher_b, capacity, r_pad,
              scale, segments, fisher_factor, measuring)
    if measuring:
        collect = launch_table.blocks_for("fisher_collect", "fp32")
        _fisher_collect_kernel[(1,)](fisher_a, fisher_b, nonfinite, fisher, final_a, final_b,
                                     shrink_programs, fisher.shape[1], float(num_samples), R_PAD=r_pad,
                                     BLOCK=collect.block_n, num_warps=collect.num_warps,
                                     num_stages=collect.num_stages)
    return grad_x, grad_a, grad_b, fisher
