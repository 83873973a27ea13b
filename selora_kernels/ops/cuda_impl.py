"""CUDA implementations of `selora::linear` and `selora::linear_backward` (Triton), with a per-shape dispatch.

`forward_cuda` / `backward_cuda` are registered as the ops' CUDA kernels by ops/selora_linear.py. Importing
this module never imports triton (the kernel modules load on the first fused call), so it is cheap and
works on machines without triton or without a GPU: there every call takes the reference path.

Forward paths (`choose_forward_path`, a table of rules; thresholds from a roofline model of the SD shapes,
docs/kernel_design.md, not yet measured on a GPU - revisit with bench/):

| rule (first match)                                                    | path      |
|-----------------------------------------------------------------------|-----------|
| dtype not fp32/fp16/bf16, or capacity > 32 (largest Triton class)     | reference |
| a training forward (it keeps U for the fused backward)                | fused     |
| M >= 4096 tokens and in x out >= 640 x 640                            | merged    |
| otherwise                                                             | fused     |

- fused: one Triton kernel (kernels/selora_linear_forward.py), x read once, y written once, the rank
  product once per program. In a training step it also keeps U = x A^T, so the fused backward skips its
  own pass over x and a launch: the roofline puts the fused training step below the merged one at every
  SD shape (docs/kernel_design.md).
- merged: `F.linear(x, W0 + s B A, b0)`: one rank-r update of the weight plus one cuBLAS GEMM. For a
  forward alone it wins where the layer is compute-bound (large M and width): cuBLAS's main loop beats
  Triton's, while the weight update costs only 3 x in x out elements. It loses where weights rival
  activations (small M).
- reference: ops/reference.py (any dtype, any capacity).

Backward: the fused Triton backward (kernels/selora_linear_backward.py) whenever the dtype is supported
and capacity (+1 trial slot while measuring) fits R_PAD 32; the reference otherwise.

`last_paths()` says which path each op took last (for benchmarks; under CUDA-graph replay no Python
runs, so it reflects the capture). `force_path("forward" | "backward", path or None)` overrides the
dispatch (benchmarks, tests).
"""
from __future__ import annotations

import importlib.util
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..fisher_stats import statistics_width
from ..kernels import launch_table
from .reference import autocast_off, backward_reference, forward_reference

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
FORWARD_PATHS = ("fused", "merged", "reference")
BACKWARD_PATHS = ("fused", "reference")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Merged forward threshold, outside training steps: the layer is compute-bound (roofline of
# docs/kernel_design.md: d >= 640 at M = 32768).
MERGED_MIN_ROWS = 4096
MERGED_MIN_WEIGHT = 640 * 640

_last_paths: Dict[str, Optional[str]] = {"forward": None, "backward": None}
_forced_paths: Dict[str, Optional[str]] = {"forward": None, "backward": None}


def last_paths() -> Dict[str, Optional[str]]:
    """{"forward": path, "backward": path} of the last CUDA call of each op (None before any call)."""
    return dict(_last_paths)


def force_path(op: str, path: Optional[str]) -> None:
    """Overrides the dispatch of `op` ("forward"/"backward") with `path`; None restores the heuristic."""
    allowed = {"forward": FORWARD_PATHS, "backward": BACKWARD_PATHS}
    if op not in allowed:
        raise ValueError(f"op must be 'forward' or 'backward', got {op!r}")
    if path is not None and path not in allowed[op]:
        raise ValueError(f"{op} path must be one of {allowed[op]} or None, got {path!r}")
    _forced_paths[op] = path


def _fits_triton(dtype: torch.dtype, slots: int) -> bool:
    return TRITON_AVAILABLE and dtype in _TRITON_DTYPES and slots <= launch_table.MAX_CAPACITY_SLOTS


def choose_forward_path(rows: int, in_features: int, out_features: int, capacity: int, dtype: torch.dtype,
                        same_dtype: bool = True, training: bool = False, measuring: bool = False) -> str:
    """"fused", "merged" or "reference" for one forward call (table in the module docstring).

    same_dtype: x, W0, b0, A and B share `dtype` (else only the reference casts them). training: a training
    forward (it keeps U for a fused backward); measuring: its step measures the Fisher (the backward then
    needs the trial slot too). A path forced with `force_path` replaces the table, but a fused launch the
    kernels cannot take still falls back."""
    if not same_dtype:
        return "reference"
    forced = _forced_paths["forward"]
    if forced is not None:
        return "reference" if forced == "fused" and not _fits_triton(dtype, capacity) else forced
    if not _fits_triton(dtype, capacity):
        return "reference"
    if training and choose_backward_path(capacity, dtype, measuring) == "fused":
        return "fused"
    if rows >= MERGED_MIN_ROWS and in_features * out_features >= MERGED_MIN_WEIGHT:
        return "merged"
    return "fused"


def choose_backward_path(capacity: int, dtype: torch.dtype, measuring: bool, same_dtype: bool = True) -> str:
    """"fused" when the kernels take the dtype and the slots (the trial slot too while measuring), unless
    `force_path` asks for the reference; "reference" otherwise."""
    if not (same_dtype and _fits_triton(dtype, statistics_width(capacity, measuring))):
        return "reference"
    return _forced_paths["backward"] or "fused"


def merged_forward(x, weight, bias, lora_a, lora_b, scale):
    """F.linear(x, W0 + s B A, b0), the update accumulated in fp32 (fp64 stays fp64) and rounded once.

    One addmm in the operands' dtype: cuBLAS computes half-precision GEMMs in fp32, adds W0 in fp32 and
    rounds the result once, so casting W0, A and B to fp32 first (three more launches and 4-byte copies
    of W0) would give the same weight at a higher cost (bench/roofline.py)."""
    if x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda:
        return F.linear(x, torch.addmm(weight, lora_b, lora_a, alpha=scale), bias)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    merged = torch.addmm(weight.to(acc), lora_b.to(acc), lora_a.to(acc), alpha=scale).to(x.dtype)
    return F.linear(x, merged, bias)


def _same_dtype(*tensors) -> bool:
    dtype = tensors[0].dtype
    return all(t is None or t.dtype == dtype for t in tensors)


def forward_cuda(x, weight, bias, lora_a, lora_b, scale, live_rank, keep=False, trial_row=None):
    """The CUDA kernel of `selora::linear`: same contract as ops.reference.forward_reference.

    keep: True for a training forward: then returns (y, kept), kept being what the fused forward kept for
    the backward ((U,), or with trial_row, a measuring step's (U_ext, non-finite row counts);
    kernels/selora_linear_forward.py), or None on the other paths."""
    measuring = trial_row is not None
    same_dtype = _same_dtype(x, weight, bias, lora_a, lora_b, trial_row)
    path = choose_forward_path(x.shape[0], x.shape[1], weight.shape[0], lora_a.shape[0], x.dtype, same_dtype,
                               training=keep, measuring=measuring)
    _last_paths["forward"] = path
    training = keep
    if path == "reference":
        y = forward_reference(x, weight, bias, lora_a, lora_b, scale, live_rank)
        return (y, None) if training else y
    with autocast_off("cuda"):
        if path == "merged":
            y = merged_forward(x, weight, bias, lora_a, lora_b, scale)
            return (y, None) if training else y
        # triton is optional: the kernel module (which imports it) loads on the first fused call
        from ..kernels.selora_linear_forward import dtype_name, selora_linear_forward_triton

        # keep U only for a fused backward (the reference recomputes everything); a measuring step keeps
        # the trial column where the kernels do (launch_table.keeps_trial_column)
        if not training or choose_backward_path(lora_a.shape[0], x.dtype, measuring, same_dtype) != "fused" \
                or (measuring and not launch_table.keeps_trial_column(dtype_name(x.dtype), x.shape[0])):
            y = selora_linear_forward_triton(x, weight, bias, lora_a, lora_b, scale)
            return (y, None) if training else y
        if live_rank.device != x.device:
            live_rank = live_rank.to(x.device, non_blocking=True)
        keep_args = (live_rank,) if not measuring else (live_rank, trial_row)
        return selora_linear_forward_triton(x, weight, bias, lora_a, lora_b, scale, keep=keep_args)


def backward_cuda(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale, num_samples,
                  per_sample_multiplier, measuring, compute_grad_x, kept=None):
    """The CUDA kernel of `selora::linear_backward`: same contract as ops.reference.backward_reference.
    kept: what forward_cuda kept for this call (or None)."""
    path = choose_backward_path(lora_a.shape[0], x.dtype, measuring,
                                _same_dtype(grad_y, x, weight, lora_a, lora_b, trial_row))
    _last_paths["backward"] = path
    if path == "reference":
        return backward_reference(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale, num_samples,
                                  per_sample_multiplier, measuring, compute_grad_x)
    # triton is optional: the kernel module (which imports it) loads on the first fused call
    from ..kernels.selora_linear_backward import selora_linear_backward_triton

    if live_rank.device != x.device:
        live_rank = live_rank.to(x.device, non_blocking=True)
    with autocast_off("cuda"):
        return selora_linear_backward_triton(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale,
                                             num_samples, per_sample_multiplier, measuring, compute_grad_x,
                                             kept=kept)
