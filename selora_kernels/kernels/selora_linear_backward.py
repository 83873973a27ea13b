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
     with each program's count of non-finite input rows. Skipped when the training forward kept them
     (`kept`, selora_linear_forward.py): the backward then reads x once, measuring or not.
  2. `_grad_x_reduce_kernel`, one program per (group of row tiles, input-column tile): dx = dy W0 + s P A
     (the forward's form mirrored), and from the same program dA's piece P^T x (the x tile of its output
     columns) and dB's piece U^T dy (its share of the output columns, from the group's dy rows it has just
     streamed: L2). A group sums its row tiles into one piece per gradient (inside one sample while
     measuring; launch_table.grad_x_groups sizes groups for about two waves of programs), so the backward
     reads x and dy once each and writes few fp32 pieces. Where x needs no gradient, `_shrink_kernel` computes
     P = dy B with dB's pieces per row tile and `_segment_reduce_kernel` dA's pieces (chunks per sample).
  3. `_finalize_grad_and_fisher_kernel`, one launch for both gradients: per (depth tile, slot) sums each
     sample's pieces (32 per load), adds the sum into the gradient and, when FISHER, squares (c g_i)^2 into
     an fp32 per-tile sum. Not measuring, it also zeroes the statistics tensor (no fill launch).
  4. While measuring, `_fisher_collect_kernel` sums the per-tile Fisher sums in tile order and the
     non-finite row counts, and writes the whole statistics tensor (layout: selora_kernels/fisher_stats.py).
  After a fused training forward (which kept U): 2 launches, 3 measuring; one more (the shrink) after a
  merged or compiled forward; without grad_x, P's shrink and the segment reduction replace grad_x.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..fisher_stats import (FISHER_COL_NONFINITE, FISHER_COL_SAMPLES, FISHER_ROW_A, FISHER_ROW_B,
                            FISHER_ROW_COUNT, statistics_shape, statistics_width)
from . import launch_table
from .selora_linear_forward import (_fp32_rank_dot, _nonfinite_rows, current_dot_precision, dtype_name,
                                    target_programs)

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
        u_t = tl.load(u_ptr + offs_m[None, :] * R_PAD + slots[:, None], mask=row_ok[None, :], other=0.0)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xd
        for k in range(0, tl.cdiv(depth, BLOCK_K)):
            k_ok = offs_k < depth - k * BLOCK_K
            x_tile = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            _store_sample_pieces(u_t, x_tile, partial_ptr, pid, offs_m, k * BLOCK_K + offs_k, k_ok, rows,
                                 segment_rows, depth, R_PAD, BLOCK_M, DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xd
    if HAS_TRIAL:  # measuring: this row tile's count of non-finite input rows
        tl.store(nonfinite_ptr + pid, _nonfinite_rows(acc, slots, capacity, row_ok))


@triton.jit
def _store_sample_pieces(low_rank_t, operand, partial_ptr, tile_m, offs_m, cols, col_ok, rows, segment_rows,
                         depth, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """partial[tile_m + i, k, cols] = sum over the rows t of this row tile in sample i of L[t, k] X[t, cols].

    low_rank_t: L^T for the tile's rows (R_PAD x BLOCK_M, fp32, zeros outside the matrix); operand: the
    BLOCK_M x len(cols) tile of X. Index tile + sample is unique (tiles and samples are both increasing in
    the row) and contiguous per sample, the layout the finalize kernel sums per sample."""
    slots = tl.arange(0, R_PAD)
    first = (tile_m * BLOCK_M) // segment_rows
    last = (tl.minimum(tile_m * BLOCK_M + BLOCK_M, rows) - 1) // segment_rows
    for segment in range(first, last + 1):
        start = segment * segment_rows
        in_segment = (offs_m >= start) & (offs_m < start + segment_rows)
        part = _fp32_rank_dot(tl.where(in_segment[None, :], low_rank_t, 0.0), operand,
                              tl.zeros((R_PAD, operand.shape[1]), dtype=tl.float32), DOT_PRECISION)
        tl.store(partial_ptr + ((tile_m + segment) * R_PAD + slots[:, None]) * depth + cols[None, :], part,
                 mask=col_ok[None, :])


@triton.jit
def _grad_x_reduce_kernel(
        dy_ptr, w_ptr, b_ptr, a_ptr, live_rank_ptr, u_ptr, x_ptr, dx_ptr, partial_ptr,
        rows, d_out, d_in, capacity, scale, segment_rows, group_tiles, slice_b, offset_b,
        stride_ym, stride_yo, stride_wo, stride_wi, stride_bo, stride_br, stride_ar, stride_ai,
        stride_xm, stride_xi, stride_dm, stride_di,
        GROUPED: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Program (row group g, input-column tile n), a group being `group_tiles` row tiles:
    #   dx[rows, n] = dy W0[:, n] + s P A[:, n], P = (dy B) . mask, for each row tile of the group;
    #   dA piece  += P^T x[rows, n]          (from the x tile this program reads, once over the grid)
    #   dB piece  += U^T dy[rows, slice n]   (a second pass over the group's dy rows, this program's share
    #                                         of the output columns: the dy tiles it has just streamed, L2)
    # GROUPED: every group lies inside one sample and writes one piece (index g + sample) per gradient.
    # Otherwise (a row tile crosses a sample boundary) a group is one row tile and writes one piece per
    # sample it touches (index tile + sample). Either way the finalize kernel sums pieces per sample.
    pid_g = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    slots = tl.arange(0, R_PAD)
    col_ok = offs_n < d_in
    slot_ok = slots < capacity
    live = slots < tl.load(live_rank_ptr)
    first_tile = pid_g * group_tiles
    last_tile = tl.minimum(first_tile + group_tiles, tl.cdiv(rows, BLOCK_M))
    piece = pid_g + (first_tile * BLOCK_M) // segment_rows
    # the group's dA piece is summed in place in its own slot of `partial` (this program's alone, L2-resident):
    # an R_PAD x BLOCK_N accumulator held in registers across the main loop spilled at R_PAD 32
    piece_a_ptrs = partial_ptr + (piece * R_PAD + slots[:, None]) * d_in + offs_n[None, :]
    for tile_m in range(first_tile, last_tile):
        offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < rows
        dy_ptrs = dy_ptr + offs_m[:, None] * stride_ym + offs_k[None, :] * stride_yo
        w_ptrs = w_ptr + offs_k[:, None] * stride_wo + offs_n[None, :] * stride_wi
        b_ptrs = b_ptr + offs_k[:, None] * stride_bo + slots[None, :] * stride_br
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        proj = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k in range(0, tl.cdiv(d_out, BLOCK_K)):
            k_ok = offs_k < d_out - k * BLOCK_K
            dy_tile = tl.load(dy_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_tile = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            b_tile = tl.load(b_ptrs, mask=k_ok[:, None] & slot_ok[None, :], other=0.0)
            # the same dy tile feeds the frozen product and P: dy is read once by the main loop
            acc = tl.dot(dy_tile, w_tile, acc, input_precision=DOT_PRECISION)
            proj = tl.dot(dy_tile, b_tile, proj, input_precision=DOT_PRECISION)
            dy_ptrs += BLOCK_K * stride_yo
            w_ptrs += BLOCK_K * stride_wo
            b_ptrs += BLOCK_K * stride_bo
        # dead slots get exactly zero whatever their contents; the rank stays on the device (no sync)
        proj = tl.where(live[None, :], proj, 0.0)
        a_tile = tl.load(a_ptr + slots[:, None] * stride_ar + offs_n[None, :] * stride_ai,
                         mask=slot_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _fp32_rank_dot(proj * scale, a_tile, acc, DOT_PRECISION)
        tl.store(dx_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_di,
                 acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        x_tile = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xi,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if GROUPED:
            acc_a = tl.load(piece_a_ptrs, mask=col_ok[None, :] & (tile_m > first_tile), other=0.0)
            acc_a = _fp32_rank_dot(tl.trans(proj), x_tile, acc_a, DOT_PRECISION)
            tl.store(piece_a_ptrs, acc_a, mask=col_ok[None, :])
            tl.debug_barrier()  # the next tile's load of the piece sees every thread's store
        else:
            _store_sample_pieces(tl.trans(proj), x_tile, partial_ptr, tile_m, offs_m, offs_n, col_ok, rows,
                                 segment_rows, d_in, R_PAD, BLOCK_M, DOT_PRECISION)
    # dB: this program's share of the output columns, BLOCK_K at a time, over the group's rows
    cols_end = tl.minimum(pid_n * slice_b + slice_b, d_out)
    # not software-pipelined (num_stages=1): prefetching the fp32 U^T tiles of this pass spilled at R_PAD 32
    for start in tl.range(pid_n * slice_b, cols_end, BLOCK_K, num_stages=1):
        cols = start + offs_k
        cols_ok = cols < cols_end
        acc_b = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
        for tile_m in tl.range(first_tile, last_tile, num_stages=1):
            offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < rows
            u_t = tl.load(u_ptr + offs_m[None, :] * R_PAD + slots[:, None], mask=row_ok[None, :], other=0.0)
            dy_tile = tl.load(dy_ptr + offs_m[:, None] * stride_ym + cols[None, :] * stride_yo,
                              mask=row_ok[:, None] & cols_ok[None, :], other=0.0)
            if GROUPED:
                acc_b = _fp32_rank_dot(u_t, dy_tile, acc_b, DOT_PRECISION)
            else:
                _store_sample_pieces(u_t, dy_tile, partial_ptr + offset_b, tile_m, offs_m, cols, cols_ok, rows,
                                     segment_rows, d_out, R_PAD, BLOCK_M, DOT_PRECISION)
        if GROUPED:
            tl.store(partial_ptr + offset_b + (piece * R_PAD + slots[:, None]) * d_out + cols[None, :], acc_b,
                     mask=cols_ok[None, :])


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
def _finalize_grad_and_fisher_kernel(partial_ptr, grad_a_ptr, grad_b_ptr, fisher_ptr,
                     segments, tiles_a, depth_a, depth_b, offset_b, chunks_a, piece_rows_a, piece_rows_b,
                     segment_rows, capacity, scale, fisher_factor, zero_count,
                     stride_ar, stride_ad, stride_br, stride_bd,
                     FISHER: tl.constexpr, R_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program per (depth tile, slot k) of dA (the first tiles_a tiles) or dB (the rest), one code path
    # for both (the values differ, not the code: two branches compiled twice the pipeline buffers).
    # g_i = sum of sample i's pieces (its gradient / s); grad[k] = s sum_i g_i; fisher tile[k] =
    # sum_i sum_n (c g_i)^2. Pieces of sample i: with piece_rows > 0 the row groups of piece_rows rows
    # touching it, each at index group + i (grad_x, the dy pass); with piece_rows 0 (dA after the segment
    # reduction) chunks i*chunks_a .. (i+1)*chunks_a - 1. dB's pieces start offset_b elements into partial.
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    if not FISHER:
        # not measuring: one program zeroes the first zero_count entries of the statistics tensor
        # (fisher_ptr), which saves the fill launch of a torch.zeros
        if pid == 0 and slot == 0:
            for start in range(0, zero_count, BLOCK_N):
                offs = start + tl.arange(0, BLOCK_N)
                tl.store(fisher_ptr + offs, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=offs < zero_count)
    is_b = pid >= tiles_a
    depth = tl.where(is_b, depth_b, depth_a)
    piece_rows = tl.where(is_b, piece_rows_b, piece_rows_a)
    rows_per_piece = tl.maximum(piece_rows, 1)
    base = partial_ptr + tl.where(is_b, offset_b, 0)
    offs_n = (pid - tl.where(is_b, tiles_a, 0)) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    col_ok = offs_n < depth
    grad = tl.zeros((BLOCK_N,), dtype=tl.float32)
    fisher = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for segment in range(0, segments):
        first_row = segment * segment_rows
        first = tl.where(piece_rows > 0, first_row // rows_per_piece + segment, segment * chunks_a)
        end = tl.where(piece_rows > 0, (first_row + segment_rows - 1) // rows_per_piece + segment + 1,
                       segment * chunks_a + chunks_a)
        # BLOCK_P pieces per load, summed in a fixed tree: latency of cdiv(pieces, BLOCK_P) loads, not pieces
        block = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for start in range(first, end, BLOCK_P):
            pieces = start + offs_p
            block += tl.load(base + (pieces[:, None] * R_PAD + slot) * depth + offs_n[None, :],
                             mask=(pieces < end)[:, None] & col_ok[None, :], other=0.0)
        sample_grad = tl.sum(block, axis=0)
        grad += sample_grad
        if FISHER:
            sample_grad = sample_grad * fisher_factor
            fisher += sample_grad * sample_grad
    value = (grad * scale).to(grad_a_ptr.dtype.element_ty)
    ok = col_ok & (slot < capacity)
    # one of the two stores is fully masked: the program writes dA's or dB's tile
    tl.store(grad_a_ptr + slot * stride_ar + offs_n * stride_ad, value, mask=ok & (pid < tiles_a))
    tl.store(grad_b_ptr + slot * stride_br + offs_n * stride_bd, value, mask=ok & is_b)
    if FISHER:
        tl.store(fisher_ptr + pid * R_PAD + slot, tl.sum(fisher, axis=0))


@triton.jit
def _fisher_collect_kernel(tiles_a_ptr, tiles_b_ptr, nonfinite_ptr, fisher_ptr, num_tiles_a, num_tiles_b,
                           num_counts, width, sample_count,
                           R_PAD: tl.constexpr, BLOCK: tl.constexpr):
    # row A = sum over dA tiles, row B = over dB tiles (fixed order),
    # count row = (N, non-finite input rows = sum of the counts (the shrink's programs or the forward's row
    # tiles), 0, ..., 0)
    offs = tl.arange(0, BLOCK)
    nonfinite = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, num_counts, BLOCK):
        nonfinite += tl.load(nonfinite_ptr + start + offs, mask=start + offs < num_counts, other=0.0)
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


class _ReducePlan:
    """Where dA's and dB's per-sample partials come from and how the finalize launch sums them.

    With grad_x: both from the grad_x launch, one piece per (row group, sample it touches) and gradient:
    groups + samples - 1 pieces at most. Without (x needs no gradient): dA from the segment reduction over
    (P, x), chunks inside each sample (about `target_programs` programs), dB from the shrink of P, one piece
    per (row tile, sample it touches)."""

    def __init__(self, rows, depth_a, depth_b, dtype_name_, segments, r_pad, target_programs, compute_grad_x):
        self.final = launch_table.blocks_for("finalize", dtype_name_)
        self.segment_rows = rows // segments
        self.final_tiles = (triton.cdiv(depth_a, self.final.block_n), triton.cdiv(depth_b, self.final.block_n))
        if compute_grad_x:
            self.grad_x = launch_table.blocks_for("grad_x", dtype_name_, rows)
            self.group_tiles, self.grouped = launch_table.grad_x_groups(rows, depth_a, dtype_name_,
                                                                        self.segment_rows, target_programs)
            self.piece_rows_a = self.piece_rows_b = self.group_tiles * self.grad_x.block_m
            self.chunks = 1
            pieces = triton.cdiv(triton.cdiv(rows, self.grad_x.block_m), self.group_tiles) + segments - 1
            pieces_a = pieces_b = pieces
        else:
            self.blocks = launch_table.blocks_for("segment_reduce", dtype_name_)
            self.tiles_a = triton.cdiv(depth_a, self.blocks.block_n)
            self.chunks, self.chunk_rows = launch_table.segment_chunks(self.segment_rows, segments, self.tiles_a,
                                                                       self.blocks, target_programs)
            self.piece_rows_a = 0  # chunks
            self.piece_rows_b = launch_table.blocks_for("shrink", dtype_name_).block_m
            pieces_a = segments * self.chunks
            pieces_b = triton.cdiv(rows, self.piece_rows_b) + segments - 1
        self.partial_shapes = ((pieces_a, r_pad, depth_a), (pieces_b, r_pad, depth_b))


def _grad_x(plan, grad_y, weight, lora_a, lora_b, live_rank, low_rank, x, grad_x, partial, offset_b, capacity, scale,
            r_pad):
    """dx, and dA's and dB's pieces into `partial` (dB's from element offset_b): one launch."""
    rows, d_out = grad_y.shape
    d_in = x.shape[1]
    blocks = plan.grad_x
    tiles_n = triton.cdiv(d_in, blocks.block_n)
    # dB's output columns shared among the programs of a group, BLOCK_K at a time
    slice_b = triton.cdiv(triton.cdiv(d_out, tiles_n), blocks.block_k) * blocks.block_k
    grid = (triton.cdiv(triton.cdiv(rows, blocks.block_m), plan.group_tiles), tiles_n)
    _grad_x_reduce_kernel[grid](
        grad_y, weight, lora_b, lora_a, live_rank, low_rank, x, grad_x, partial,
        rows, d_out, d_in, capacity, float(scale), plan.segment_rows, plan.group_tiles, slice_b, offset_b,
        grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1), lora_b.stride(0), lora_b.stride(1),
        lora_a.stride(0), lora_a.stride(1), x.stride(0), x.stride(1), grad_x.stride(0), grad_x.stride(1),
        GROUPED=plan.grouped, R_PAD=r_pad, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
        BLOCK_K=blocks.block_k, DOT_PRECISION=current_dot_precision(x.dtype), num_warps=blocks.num_warps,
        num_stages=blocks.num_stages)


def _finalize(plan, partial, offset_b, grad_a, grad_b, fisher_tiles, capacity, r_pad, scale, segments,
              fisher_factor, measuring, stats):
    """grad_a, grad_b (written in place) = s * the sums of their pieces, one launch. Per-tile Fisher sums go
    to fisher_tiles (dA's tiles, then dB's) while measuring; otherwise the launch zeroes `stats`."""
    depth_a, depth_b = grad_a.shape[1], grad_b.shape[0]
    slots = min(capacity + int(measuring), r_pad)  # the trial slot's Fisher while measuring
    _finalize_grad_and_fisher_kernel[(sum(plan.final_tiles), slots)](
        partial, grad_a, grad_b, fisher_tiles if measuring else stats,
        segments, plan.final_tiles[0], depth_a, depth_b, offset_b, plan.chunks, plan.piece_rows_a,
        plan.piece_rows_b, plan.segment_rows, capacity, float(scale), float(fisher_factor),
        0 if measuring else stats.numel(), grad_a.stride(0), grad_a.stride(1), grad_b.stride(1), grad_b.stride(0),
        FISHER=measuring, R_PAD=r_pad, BLOCK_P=plan.final.block_m, BLOCK_N=plan.final.block_n,
        num_warps=plan.final.num_warps, num_stages=plan.final.num_stages)


def selora_linear_backward_triton(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale: float,
                                  num_samples: int, per_sample_multiplier: float, measuring: bool,
                                  compute_grad_x: bool, kept=None):
    """(grad_x, grad_a, grad_b, fisher): exactly the contract of ops.reference.backward_reference.

    x, grad_y: 2-D (M x in, M x out), any strides, one dtype (fp32/fp16/bf16) shared with weight, lora_a,
    lora_b and trial_row; live_rank: a 0-d integer device tensor (never read on the host). fisher is
    fp32 in the layout of fisher_stats, zeros when not measuring. kept: what the training forward kept
    (selora_linear_forward_triton's `keep`): (U,), or while measuring (U_ext, non-finite row counts), so
    the shrink of U (a second read of x) is skipped; None computes them here."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    capacity = lora_a.shape[0]
    device = x.device
    if measuring and rows % num_samples:
        raise ValueError(f"{rows} input rows cannot be split into {num_samples} samples")
    # No fill launch: measuring, _fisher_collect_kernel writes every entry; not measuring, the finalize
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
                       target_programs(device), compute_grad_x)
    if kept is not None and (len(kept) != 1 + measuring or kept[0].shape != (rows, r_pad)):
        raise ValueError(f"the kept forward tensors do not match this backward ({len(kept)} tensors, U "
                         f"{tuple(kept[0].shape)}; expected {1 + measuring}, U {(rows, r_pad)}: U, and the "
                         f"non-finite row counts while measuring; measuring={measuring})")
    # the non-finite row counts come from the shrink's programs, or from the forward's row tiles
    count_programs = _shrink_programs(x) if kept is None else kept[-1].numel()
    # dA's pieces, then dB's, in one buffer: the finalize launch reads both
    partial_a, partial_b = plan.partial_shapes
    size_a = -(-math.prod(partial_a) // 4) * 4
    work = _Workspace(device, {
        **({"proj_grad": (rows, r_pad)} if not compute_grad_x else {}),  # P = (dy B) . mask
        **({"low_rank": (rows, r_pad)} if kept is None else {}),  # U = (x A_ext^T) . mask
        "partial": (size_a + math.prod(partial_b),),
        **({"nonfinite": (count_programs,)} if measuring and kept is None else {}),
        **({"fisher_tiles": (sum(plan.final_tiles), r_pad)} if measuring else {}),
    })
    partial = work["partial"]
    nonfinite = None
    if kept is not None:
        low_rank, nonfinite = kept[0], kept[1] if measuring else None
    else:
        # x pass: U first, so the dy pass can emit dB's pieces from the dy tiles it loads anyway
        low_rank, nonfinite = work["low_rank"], work["nonfinite"] if measuring else None
        trial = trial_row.contiguous() if measuring else None  # read as a unit-stride vector
        _shrink(x, lora_a, (lora_a.stride(0), lora_a.stride(1)), trial, live_rank, low_rank, nonfinite, capacity,
                r_pad)
    if compute_grad_x:
        _grad_x(plan, grad_y, weight, lora_a, lora_b, live_rank, low_rank, x, grad_x, partial, size_a, capacity,
                scale, r_pad)
    else:
        proj_grad = work["proj_grad"]
        _shrink(grad_y, lora_b, (lora_b.stride(1), lora_b.stride(0)), None, live_rank, proj_grad, None, capacity,
                r_pad, (low_rank, partial[size_a:], plan.segment_rows))
        blocks = plan.blocks
        _segment_reduce_kernel[(segments * plan.chunks, plan.tiles_a)](
            proj_grad, x, partial, plan.segment_rows, plan.chunk_rows, plan.chunks, in_features,
            x.stride(0), x.stride(1), R_PAD=r_pad, BLOCK_N=blocks.block_n, BLOCK_T=blocks.block_k,
            DOT_PRECISION=current_dot_precision(x.dtype), num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    fisher_tiles = work["fisher_tiles"] if measuring else None
    _finalize(plan, partial, size_a, grad_a, grad_b, fisher_tiles, capacity, r_pad, scale, segments,
              scale * per_sample_multiplier, measuring, fisher)
    if measuring:
        final_a, final_b = plan.final_tiles
        collect = launch_table.blocks_for("fisher_collect", "fp32")
        _fisher_collect_kernel[(1,)](fisher_tiles, fisher_tiles[final_a:], nonfinite, fisher, final_a, final_b,
                                     count_programs, fisher.shape[1], float(num_samples), R_PAD=r_pad,
                                     BLOCK=collect.block_n, num_warps=collect.num_warps,
                                     num_stages=collect.num_stages)
    return grad_x, grad_a, grad_b, fisher
