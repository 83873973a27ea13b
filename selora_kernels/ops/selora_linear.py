"""torch.library ops of the SeLoRA linear and the autograd.Function over them.

Two ops, both functional (no mutation), so they work under torch.compile and CUDA graphs:

- ``torch.ops.selora.linear(x, weight, bias, lora_a, lora_b, scale, live_rank, scale_tensor=None) -> y``: the
  forward (scale_tensor, a 0-d float64 CPU tensor, replaces scale when given);
- ``torch.ops.selora.linear_backward(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale,
  num_samples, per_sample_multiplier, measuring, compute_grad_x, scale_tensor=None) -> (grad_x, grad_a, grad_b, fisher_stats)``.

Each op has one implementation per device, registered in one place below: the reference (ops/reference.py)
for every device, the Triton dispatch (ops/cuda_impl.py) for CUDA. torch's dispatcher picks between them.

`SeLoRALinearFunction`, what SeLoRALinear calls, ties them together as flash-attn's `FlashAttnFunc` does:
the forward op takes only forward arguments; the trial row, the sample count, the per-sample multiplier and
the measuring flag ride on `ctx` for the backward. The per-sample Fisher leaves the backward as the
*gradient of the probe*, a (3, capacity + 1) leaf tensor that requires grad, so autograd accumulates the
statistics over backward calls with no side effects in the graph. The forward op used on its own is
differentiable too (plain gradients, no Fisher), so it passes torch.library.opcheck.

Under torch.compile the Function calls the ops (opaque to the compiler, with fake implementations); in eager
mode it calls the same implementations directly: going through the dispatcher on every call measured 25-30 us
more per layer and training step on a CPU (200 small layers: 15 -> 21 ms per forward + backward).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..fisher_stats import fisher_dtype, statistics_shape
from . import cuda_impl
from .cuda_impl import backward_cuda, forward_cuda
from .reference import backward_reference, forward_reference


@contextlib.contextmanager
def using_path(name: str) -> Iterator[None]:
    """Within the block, CUDA calls of both ops take path `name` ("fused", "merged" or "reference") instead of
    the per-shape dispatch (for benchmarks and tests; last_paths() says what ran). "merged" is a forward path
    only: the backward keeps its own choice. A fused launch the kernels cannot take still falls back to the
    reference. The previous setting comes back on exit."""
    if name not in cuda_impl.FORWARD_PATHS:
        raise ValueError(f"path must be one of {cuda_impl.FORWARD_PATHS}, got {name!r}")
    previous = dict(cuda_impl._forced_paths)
    cuda_impl.force_path("forward", name)
    cuda_impl.force_path("backward", name if name in cuda_impl.BACKWARD_PATHS else None)
    try:
        yield
    finally:
        cuda_impl.force_path("forward", previous["forward"])
        cuda_impl.force_path("backward", previous["backward"])


def _host_scale(scale: float, scale_tensor: Optional[Tensor]) -> float:
    """s: `scale_tensor` (a 0-d float64 CPU tensor, read without a device sync) replaces `scale` when given.
    A compiled graph takes s as a tensor input, so a new s (alpha_over_r growth) needs no recompile."""
    return scale if scale_tensor is None else float(scale_tensor)


@torch.library.custom_op("selora::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scale: float,
           live_rank: Tensor, scale_tensor: Optional[Tensor] = None) -> Tensor:
    return forward_reference(x, weight, bias, lora_a, lora_b, _host_scale(scale, scale_tensor), live_rank)


@torch.library.custom_op("selora::linear_backward", mutates_args=())
def linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                    trial_row: Optional[Tensor], live_rank: Tensor, scale: float, num_samples: int,
                    per_sample_multiplier: float, measuring: bool, compute_grad_x: bool,
                    scale_tensor: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backward_reference(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank,
                              _host_scale(scale, scale_tensor), num_samples, per_sample_multiplier, measuring,
                              compute_grad_x)


@linear.register_fake
def _linear_fake(x, weight, bias, lora_a, lora_b, scale, live_rank, scale_tensor=None):
    return x.new_empty(x.shape[0], weight.shape[0])


@linear_backward.register_fake
def _linear_backward_fake(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale, num_samples,
                          per_sample_multiplier, measuring, compute_grad_x, scale_tensor=None):
    grad_x = x.new_empty(x.shape) if compute_grad_x else x.new_empty(0)
    fisher = x.new_empty(statistics_shape(lora_a.shape[0]), dtype=fisher_dtype(x.dtype))
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b), fisher


# The device dispatch, in one block: the reference above serves every device, Triton serves CUDA; eager
# calls make the same choice without the dispatcher's per-call cost.
@linear.register_kernel("cuda")
def _linear_cuda(x, weight, bias, lora_a, lora_b, scale, live_rank, scale_tensor=None):
    return forward_cuda(x, weight, bias, lora_a, lora_b, _host_scale(scale, scale_tensor), live_rank)


@linear_backward.register_kernel("cuda")
def _linear_backward_cuda(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale, num_samples,
                          per_sample_multiplier, measuring, compute_grad_x, scale_tensor=None):
    return backward_cuda(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, _host_scale(scale, scale_tensor),
                         num_samples, per_sample_multiplier, measuring, compute_grad_x)


def _forward_implementation(x: Tensor):
    if torch.compiler.is_compiling():
        return torch.ops.selora.linear
    return forward_cuda if x.is_cuda else forward_reference


def keeps_forward_tensors(x: Tensor, needs_input_grad) -> bool:
    """Whether a training forward keeps U for the backward: eager CUDA calls that need an adapter gradient
    (under torch.compile the ops, whose contract has no such output, are used). The caller also passes
    torch.is_grad_enabled() as `grad_enabled`: inside Function.forward grad mode is always off and
    needs_input_grad does not see torch.no_grad()."""
    return x.is_cuda and not torch.compiler.is_compiling() and bool(needs_input_grad[3] or needs_input_grad[4])


def _backward_implementation(x: Tensor):
    if torch.compiler.is_compiling():
        return torch.ops.selora.linear_backward
    return backward_cuda if x.is_cuda else backward_reference


def _gradients(backward, needs_input_grad, grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale,
               num_samples, per_sample_multiplier, measuring):
    if needs_input_grad[1] or needs_input_grad[2]:
        raise RuntimeError("selora::linear keeps W0 and b0 frozen; set requires_grad=False on them "
                           "(SeLoRALinear.from_linear does this)")
    if isinstance(scale, Tensor):  # only the ops take s as a tensor (under torch.compile)
        return backward(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, 1.0, num_samples,
                        per_sample_multiplier, measuring, bool(needs_input_grad[0]), scale)
    return backward(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale, num_samples,
                    per_sample_multiplier, measuring, bool(needs_input_grad[0]))


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, live_rank, scale_tensor = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, live_rank)
    ctx.scale = scale if scale_tensor is None else scale_tensor


def _linear_backward_formula(ctx, grad_y):
    # the forward op on its own: nothing measured. Always the op: torch.library traces this formula.
    x, weight, lora_a, lora_b, live_rank = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_a, grad_b, _ = _gradients(torch.ops.selora.linear_backward, needs, grad_y, x, weight, lora_a,
                                           lora_b, None, live_rank, ctx.scale, 1, 1.0, False)
    return (grad_x if needs[0] else None, None, None, grad_a if needs[3] else None,
            grad_b if needs[4] else None, None, None, None)


linear.register_autograd(_linear_backward_formula, setup_context=_linear_setup_context)


class SeLoRALinearFunction(torch.autograd.Function):
    """y = x W0^T + b0 + s (x A^T) B^T with the SeLoRA backward; what SeLoRALinear calls.

    fisher_probe: None, or the (3, capacity + 1) leaf whose gradient receives the Fisher statistics while
    `measuring`. grad_enabled: torch.is_grad_enabled() at the call (a training forward keeps U = x A^T for
    the fused backward, M x 16 or 32 fp32 values per layer, with the trial column while measuring). scale: a float, or (under torch.compile) a 0-d float64 CPU tensor holding s. W0 and b0 stay frozen (no gradient is computed for them)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                trial_row: Tensor, live_rank: Tensor, fisher_probe: Optional[Tensor], scale,
                num_samples: int, per_sample_multiplier: float, measuring: bool,
                grad_enabled: bool = False) -> Tensor:
        ctx.scale = scale
        ctx.num_samples = num_samples
        ctx.per_sample_multiplier = per_sample_multiplier
        ctx.measuring = measuring and fisher_probe is not None
        ctx.probe_dtype = fisher_probe.dtype if fisher_probe is not None else None
        ctx.kept = False
        if isinstance(scale, Tensor):  # only the op takes s as a tensor (under torch.compile)
            y = torch.ops.selora.linear(x, weight, bias, lora_a, lora_b, 1.0, live_rank, scale)
        elif grad_enabled and keeps_forward_tensors(x, ctx.needs_input_grad):
            # the fused forward keeps U = x A^T (while measuring with the trial column and the non-finite
            # row counts), so the backward reads x once (cuda_impl.forward_cuda)
            y, kept = forward_cuda(x, weight, bias, lora_a, lora_b, scale, live_rank, keep=True,
                                   trial_row=trial_row if ctx.measuring else None)
            if kept is not None:
                ctx.kept = True
                ctx.save_for_backward(x, weight, lora_a, lora_b, trial_row, live_rank, *kept)
                return y
        else:
            y = _forward_implementation(x)(x, weight, bias, lora_a, lora_b, scale, live_rank)
        ctx.save_for_backward(x, weight, lora_a, lora_b, trial_row, live_rank)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, lora_a, lora_b, trial_row, live_rank, *kept = ctx.saved_tensors
        needs = ctx.needs_input_grad
        backward = _backward_implementation(x)
        if ctx.kept:
            backward = functools.partial(backward_cuda, kept=tuple(kept))
        grad_x, grad_a, grad_b, fisher = _gradients(backward, needs, grad_y, x, weight, lora_a,
                                                    lora_b, trial_row, live_rank, ctx.scale, ctx.num_samples,
                                                    ctx.per_sample_multiplier, ctx.measuring)
        probe_grad = fisher.to(ctx.probe_dtype) if ctx.measuring else None
        return (grad_x if needs[0] else None, None, None, grad_a if needs[3] else None,
                grad_b if needs[4] else None, None, None, probe_grad, None, None, None, None, None)
