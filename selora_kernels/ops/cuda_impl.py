"""CUDA implementations of `selora::linear` and `selora::linear_backward` (Triton), with a per-shape dispatch.

Registered on the CustomOpDefs of ops/selora_linear.py when triton is importable; the import of this
module itself never imports triton (kernels load on the first CUDA call), so it is cheap and works on
machines without triton or without a GPU.

Forward paths (`choose_forward_path`, a table of rules; thresholds from the roofline of KERNEL_NOTES
section 8, not yet measured on a GPU - revisit with bench/):

| rule (first match)                                                    | path      |
|-----------------------------------------------------------------------|-----------|
| dtype not fp32/fp16/bf16, or capacity > 32 (largest Triton class)     | reference |
| M >= 4096 tokens and in x out >= 640 x 640                            | merged    |
| otherwise                                                             | fused     |

- fused: one Triton kernel (kernels/selora_linear_forward.py), x read once, y written once.
- merged: `F.linear(x, W0 + s B A, b0)`: one rank-r update of the weight plus one cuBLAS GEMM. It wins
  where the layer is compute-bound (large M and width): cuBLAS's main loop beats Triton's and the fused
  kernel recomputes the R_PAD-wide rank dot per column tile (R_PAD / BN = 25-50% extra FLOPs), while the
  weight update costs only 3 x in x out elements. It loses where weights rival activations (small M).
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

from ..kernels import configs
from .reference import backward_reference, forward_reference
from .selora_linear import autocast_off, register_device_kernels, selora_linear, selora_linear_backward

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
FORWARD_PATHS = ("fused", "merged", "reference")
BACKWARD_PATHS = ("fused", "reference")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Merged forward threshold: the layer is compute-bound (KERNEL_NOTES section 8.2: d >= 640 at M = 32768).
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
    return TRITON_AVAILABLE and dtype in _TRITON_DTYPES and slots <= configs.MAX_CAPACITY_SLOTS


def choose_forward_path(rows: int, in_features: int, out_features: int, capacity: int, dtype: torch.dtype,
                        training: bool) -> str:
    """"fused", "merged" or "reference" for one forward call (table in the module docstring).

    `training` does not change the choice today: the backward is a separate op with its own dispatch and
    neither forward path saves anything extra for it."""
    del training
    if not _fits_triton(dtype, capacity):
        return "reference"
    if rows >= MERGED_MIN_ROWS and in_features * out_features >= MERGED_MIN_WEIGHT:
        return "merged"
    return "fused"


def choose_backward_path(capacity: int, dtype: torch.dtype, measuring: bool) -> str:
    return "fused" if _fits_triton(dtype, capacity + 1 if measuring else capacity) else "reference"


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


def selora_linear_cuda(x, weight, bias, lora_a, lora_b, trial_row, live_rank, fisher_probe, scale,
                       num_samples, per_sample_multiplier, measuring):
    with autocast_off("cuda"):
        return _forward_cuda(x, weight, bias, lora_a, lora_b, scale)


def _forward_cuda(x, weight, bias, lora_a, lora_b, scale):
    path = _forced_paths["forward"] or choose_forward_path(x.shape[0], x.shape[1], weight.shape[0],
                                                           lora_a.shape[0], x.dtype, torch.is_grad_enabled())
    if path != "reference" and not _same_dtype(x, weight, bias, lora_a, lora_b):
        path = "reference"
    if path == "fused" and not _fits_triton(x.dtype, lora_a.shape[0]):
        path = "reference"
    _last_paths["forward"] = path
    if path == "fused":
        from ..kernels.selora_linear_forward import selora_linear_forward_triton

        return selora_linear_forward_triton(x, weight, bias, lora_a, lora_b, scale)
    if path == "merged":
        return merged_forward(x, weight, bias, lora_a, lora_b, scale)
    return forward_reference(x, weight, bias, lora_a, lora_b, scale)


def selora_linear_backward_cuda(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale, num_samples,
                                per_sample_multiplier, measuring, compute_grad_x):
    with autocast_off("cuda"):
        return _backward_cuda(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale, num_samples,
                              per_sample_multiplier, measuring, compute_grad_x)


def _backward_cuda(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale, num_samples,
                   per_sample_multiplier, measuring, compute_grad_x):
    capacity = lora_a.shape[0]
    path = _forced_paths["backward"] or choose_backward_path(capacity, x.dtype, measuring)
    if not (_same_dtype(grad_y, x, weight, lora_a, lora_b, trial_row)
            and _fits_triton(x.dtype, capacity + 1 if measuring else capacity)):
        path = "reference"
    _last_paths["backward"] = path
    if path == "fused":
        from ..kernels.selora_linear_backward import selora_linear_backward_triton

        if live_rank.device != x.device:
            live_rank = live_rank.to(x.device, non_blocking=True)
        return selora_linear_backward_triton(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale,
                                             num_samples, per_sample_multiplier, measuring, compute_grad_x)
    return backward_reference(grad_y.contiguous(), x, weight, lora_a, lora_b, trial_row, live_rank, scale,
                              num_samples, per_sample_multiplier, measuring, compute_grad_x)


if TRITON_AVAILABLE:
    selora_linear.register_kernel("cuda")(selora_linear_cuda)
    selora_linear_backward.register_kernel("cuda")(selora_linear_backward_cuda)
    register_device_kernels("cuda", selora_linear_cuda, selora_linear_backward_cuda)
