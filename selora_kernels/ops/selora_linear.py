"""torch.library ops of the SeLoRA linear: schemas, fake implementations, autograd, CPU implementation.

Two ops, both functional (no mutation), so they work under torch.compile and CUDA graphs:

- ``selora::linear(x, weight, bias, lora_a, lora_b, trial_row, live_rank, fisher_probe, scale,
  num_samples, per_sample_multiplier, measuring) -> y``: the forward. ``trial_row``, ``live_rank`` and
  ``fisher_probe`` are used only by its backward.
- ``selora::linear_backward(...) -> (grad_x, grad_a, grad_b, fisher_stats)``.

The per-sample Fisher leaves the backward as the *gradient of the probe*: a (3, capacity + 1) leaf tensor
that requires grad, so autograd accumulates the statistics over backward calls with no side effects in the
graph. The reference implementation below serves every device; GPU kernels register themselves for the
same ops (``selora_kernels.kernels``), so callers never choose a backend.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .reference import FISHER_ROWS, backward_reference, fisher_dtype, forward_reference, host_live_rank


def autocast_off(device_type: str):
    """Autocast stays on inside op implementations; the caller already chose the compute dtype."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def reference_forward(x, weight, bias, lora_a, lora_b, trial_row, live_rank, fisher_probe, scale, num_samples,
                      per_sample_multiplier, measuring):
    with autocast_off(x.device.type):
        return forward_reference(x, weight, bias, lora_a, lora_b, scale, host_live_rank(live_rank))


def reference_backward(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale, num_samples,
                       per_sample_multiplier, measuring, compute_grad_x):
    with autocast_off(x.device.type):
        return backward_reference(grad_y.contiguous(), x, weight, lora_a, lora_b, trial_row, live_rank, scale,
                                  num_samples, per_sample_multiplier, measuring, compute_grad_x)


# (forward, backward) implementations by device type, shared by the torch.library ops and the eager
# autograd.Function; GPU kernels add theirs with register_device_kernels.
DEVICE_KERNELS = {}


def register_device_kernels(device_type: str, forward, backward) -> None:
    DEVICE_KERNELS[device_type] = (forward, backward)


def _kernels(device_type: str):
    return DEVICE_KERNELS.get(device_type, (reference_forward, reference_backward))


@torch.library.custom_op("selora::linear", mutates_args=())
def selora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                  trial_row: Tensor, live_rank: Tensor, fisher_probe: Optional[Tensor], scale: float,
                  num_samples: int, per_sample_multiplier: float, measuring: bool) -> Tensor:
    return reference_forward(x, weight, bias, lora_a, lora_b, trial_row, live_rank, fisher_probe, scale,
                             num_samples, per_sample_multiplier, measuring)


@selora_linear.register_fake
def _selora_linear_fake(x, weight, bias, lora_a, lora_b, trial_row, live_rank, fisher_probe, scale,
                        num_samples, per_sample_multiplier, measuring):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("selora::linear_backward", mutates_args=())
def selora_linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                           trial_row: Tensor, live_rank: Tensor, scale: float, num_samples: int,
                           per_sample_multiplier: float, measuring: bool,
                           compute_grad_x: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return reference_backward(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale, num_samples,
                              per_sample_multiplier, measuring, compute_grad_x)


@selora_linear_backward.register_fake
def _selora_linear_backward_fake(grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, scale,
                                 num_samples, per_sample_multiplier, measuring, compute_grad_x):
    grad_x = x.new_empty(x.shape) if compute_grad_x else x.new_empty(0)
    fisher = x.new_empty(FISHER_ROWS, lora_a.shape[0] + 1, dtype=fisher_dtype(x.dtype))
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b), fisher


def _setup_context(ctx, inputs, output):
    (x, weight, bias, lora_a, lora_b, trial_row, live_rank, fisher_probe, scale, num_samples,
     per_sample_multiplier, measuring) = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, trial_row, live_rank)
    ctx.scale = scale
    ctx.num_samples = num_samples
    ctx.per_sample_multiplier = per_sample_multiplier
    ctx.measuring = measuring and fisher_probe is not None
    ctx.probe_dtype = fisher_probe.dtype if fisher_probe is not None else None


def _backward_with(ctx, grad_y, backward_fn):
    x, weight, lora_a, lora_b, trial_row, live_rank = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if needs[1] or needs[2]:
        raise RuntimeError("selora::linear keeps W0 and b0 frozen; set requires_grad=False on them "
                           "(SeLoRALinear.from_linear does this)")
    grad_x, grad_a, grad_b, fisher = backward_fn(
        grad_y, x, weight, lora_a, lora_b, trial_row, live_rank, ctx.scale, ctx.num_samples,
        ctx.per_sample_multiplier, ctx.measuring, bool(needs[0]))
    probe_grad = fisher.to(ctx.probe_dtype) if ctx.measuring else None
    return (grad_x if needs[0] else None, None, None, grad_a if needs[3] else None,
            grad_b if needs[4] else None, None, None, probe_grad, None, None, None, None)


def _backward(ctx, grad_y):
    return _backward_with(ctx, grad_y, selora_linear_backward)


selora_linear.register_autograd(_backward, setup_context=_setup_context)


class _EagerSeLoRALinear(torch.autograd.Function):
    """The same forward/backward as the ops, without the custom-op wrapper's per-call Python cost (~100 us
    forward + ~250 us backward on CPU, i.e. tens of ms per step over a UNet's ~200 adapted layers)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _kernels(inputs[0].device.type)[0](*inputs)
        _setup_context(ctx, inputs, output)
        ctx.device_type = inputs[0].device.type
        return output

    @staticmethod
    def backward(ctx, grad_y):
        return _backward_with(ctx, grad_y, _kernels(ctx.device_type)[1])


def selora_linear_autograd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                           trial_row: Tensor, live_rank: Tensor, fisher_probe: Optional[Tensor], scale: float,
                           num_samples: int, per_sample_multiplier: float, measuring: bool) -> Tensor:
    """What modules call: the torch.library op while torch.compile traces (functional, with fake
    implementations), the eager autograd.Function over the same kernels otherwise."""
    args = (x, weight, bias, lora_a, lora_b, trial_row, live_rank, fisher_probe, scale, num_samples,
            per_sample_multiplier, measuring)
    if torch.compiler.is_compiling():
        return selora_linear(*args)
    return _EagerSeLoRALinear.apply(*args)


from . import cuda_impl  # noqa: E402,F401  (registers GPU kernels)
