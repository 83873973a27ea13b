"""Python API of the capacity-buffer operators (``torch.ops.selora_ext``): the only thing the rest of
the library calls.

Each function validates its arguments (ValueError naming the index and the values), then runs either
the compiled operator (``backend="extension"``) or the pure-PyTorch fallback below
(``backend="fallback"``); ``backend="auto"`` takes the extension when ``selora_kernels._extension``
could load it. The fallbacks are the reference semantics and never read a device value either.

    grow_capacity_  grow buffers along their slot dimension in place (new slots zero, same objects)
    expand_slots_   adopt the trial row K of many modules at once and draw the next trial rows
    adam_step_      multi-tensor AdamW with one step counter per slot (optim/selora_adamw.py says why)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .._extension import extension_status, has_extension

__all__ = ["grow_capacity_", "expand_slots_", "adam_step_", "kaiming_uniform_bound", "BACKENDS"]

BACKENDS = ("auto", "extension", "fallback")


def _use_extension(backend: str) -> bool:
    if backend == "fallback":
        return False
    if backend == "auto":
        return has_extension()
    if backend == "extension":
        if not has_extension():
            raise RuntimeError(
                "backend='extension' but the selora_ext extension is not loaded "
                f"(route: {extension_status()}); see selora_kernels._extension")
        return True
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def kaiming_uniform_bound(in_features: int) -> float:
    """Bound of nn.init.kaiming_uniform_(a=0) (gain sqrt(2)) for a row of `in_features` inputs: sqrt(6 / in).

    The one bound of the library: initial adapter rows, trial rows and the C++ expand_slots_ draw from it."""
    return math.sqrt(6.0 / in_features)


# ---------------------------------------------------------------------------------------------------
# grow_capacity_
# ---------------------------------------------------------------------------------------------------
def _check_grow(tensors: Sequence[torch.Tensor], slot_dims: Sequence[int], new_capacity: int) -> None:
    if len(tensors) != len(slot_dims):
        raise ValueError(f"grow_capacity_: got {len(tensors)} tensors but {len(slot_dims)} slot_dims")
    if new_capacity < 0:
        raise ValueError(f"grow_capacity_: new_capacity must be >= 0, got {new_capacity}")
    for i, (tensor, dim) in enumerate(zip(tensors, slot_dims)):
        if not 0 <= dim < tensor.dim():
            raise ValueError(f"grow_capacity_: slot_dims[{i}] = {dim} is not a dimension of tensors[{i}] "
                             f"with shape {tuple(tensor.shape)}")
        if tensor.size(dim) > new_capacity:
            raise ValueError(f"grow_capacity_: tensors[{i}] has {tensor.size(dim)} slots along dim {dim} but "
                             f"new_capacity is {new_capacity} (capacity buffers never shrink)")


def _grow_capacity_fallback(tensors, slot_dims, new_capacity) -> None:
    for tensor, dim in zip(tensors, slot_dims):
        old_capacity = tensor.size(dim)
        if old_capacity == new_capacity:
            continue
        new_shape = list(tensor.shape)
        new_shape[dim] = new_capacity
        grown = torch.zeros(new_shape, dtype=tensor.dtype, device=tensor.device)
        grown.narrow(dim, 0, old_capacity).copy_(tensor)
        tensor.set_(grown)


@torch.no_grad()
def grow_capacity_(tensors: Sequence[torch.Tensor], slot_dims: Sequence[int], new_capacity: int, *,
                   backend: str = "auto") -> None:
    """Grows each tensor to `new_capacity` along `slot_dims[i]`, in place (``Tensor.set_``).

    The same Python objects (Parameters, their .grad, optimizer state) end up with the bigger shape:
    old values in the leading slice, zeros in the new slots. Equal size: no-op; bigger: ValueError.
    """
    if torch.compiler.is_compiling():
        # resizing inputs is a metadata mutation no op schema can declare: a traced graph cannot hold it
        raise RuntimeError("grow_capacity_ cannot run inside torch.compile: it reallocates its inputs in place "
                           "(shape change); grow the adapters outside the compiled region (ExpansionController "
                           "does this after optimizer.step)")
    tensors, slot_dims, new_capacity = list(tensors), [int(d) for d in slot_dims], int(new_capacity)
    _check_grow(tensors, slot_dims, new_capacity)
    if _use_extension(backend):
        torch.ops.selora_ext.grow_capacity_(tensors, slot_dims, new_capacity)
    else:
        _grow_capacity_fallback(tensors, slot_dims, new_capacity)


# ---------------------------------------------------------------------------------------------------
# expand_slots_
# ---------------------------------------------------------------------------------------------------
def _check_expand(lora_a, lora_b, trial_rows, live_ranks, ranks, seed) -> None:
    n = len(lora_a)
    if not (len(lora_b) == len(trial_rows) == len(live_ranks) == len(ranks) == n):
        raise ValueError(f"expand_slots_: list lengths differ: lora_a {n}, lora_b {len(lora_b)}, trial_rows "
                         f"{len(trial_rows)}, live_ranks {len(live_ranks)}, ranks {len(ranks)}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"expand_slots_: seed must be in [0, 2**63), got {seed}")
    for i in range(n):
        a, b, trial_row, live_rank, rank = lora_a[i], lora_b[i], trial_rows[i], live_ranks[i], ranks[i]
        if a.dim() != 2:
            raise ValueError(f"expand_slots_: lora_a[{i}] must be 2-D (capacity, in), got shape {tuple(a.shape)}")
        if b.dim() != 2:
            raise ValueError(f"expand_slots_: lora_b[{i}] must be 2-D (out, capacity), got shape {tuple(b.shape)}")
        if a.size(0) != b.size(1):
            raise ValueError(f"expand_slots_: capacity mismatch at index {i}: lora_a[{i}] has {a.size(0)} slots, "
                             f"lora_b[{i}] has {b.size(1)}")
        if tuple(trial_row.shape) != (a.size(1),):
            raise ValueError(f"expand_slots_: trial_rows[{i}] must have shape ({a.size(1)},), got "
                             f"{tuple(trial_row.shape)}")
        if live_rank.dim() != 0 or live_rank.dtype != torch.int64:
            raise ValueError(f"expand_slots_: live_ranks[{i}] must be a 0-d int64 tensor, got shape "
                             f"{tuple(live_rank.shape)} dtype {live_rank.dtype}")
        if not 0 <= rank < a.size(0):
            raise ValueError(f"expand_slots_: ranks[{i}] = {rank} but capacity is {a.size(0)} "
                             "(need 0 <= rank < capacity; grow_capacity_ first)")


def _expand_slots_fallback(lora_a, lora_b, trial_rows, live_ranks, ranks, seed) -> None:
    for a, b, trial_row, live_rank, rank in zip(lora_a, lora_b, trial_rows, live_ranks, ranks):
        a[rank].copy_(trial_row)
        b[:, rank].zero_()
        live_rank.fill_(rank + 1)
    # Same generator, same uniform_ kernel on a CPU float32 tensor as the C++ operator: bit-identical.
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    for a, trial_row in zip(lora_a, trial_rows):
        in_features = a.size(1)
        bound = kaiming_uniform_bound(in_features)
        row = torch.empty(in_features, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        trial_row.copy_(row)


@torch.no_grad()
def expand_slots_(lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                  trial_rows: Sequence[torch.Tensor], live_ranks: Sequence[torch.Tensor], ranks: Sequence[int],
                  seed: int, *, backend: str = "auto") -> None:
    """Adopts the trial row of every module and draws the next trial rows, in one call.

    For module i with r = ranks[i] (host copy of live_ranks[i], so nothing syncs; r < capacity):
    A_i[r, :] = trial_rows[i], B_i[:, r] = 0, live_ranks[i] = r + 1. Then, from one CPU generator seeded
    with `seed`, in list order: trial_rows[i] <- U(-sqrt(6 / in_i), sqrt(6 / in_i)) drawn in float32.
    """
    lora_a, lora_b, trial_rows, live_ranks = list(lora_a), list(lora_b), list(trial_rows), list(live_ranks)
    ranks, seed = [int(r) for r in ranks], int(seed)
    _check_expand(lora_a, lora_b, trial_rows, live_ranks, ranks, seed)
    if _use_extension(backend):
        torch.ops.selora_ext.expand_slots_(lora_a, lora_b, trial_rows, live_ranks, ranks, seed)
    else:
        _expand_slots_fallback(lora_a, lora_b, trial_rows, live_ranks, ranks, seed)


# ---------------------------------------------------------------------------------------------------
# adam_step_
# ---------------------------------------------------------------------------------------------------
_ADAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_adam(params, grads, exp_avgs, exp_avg_sqs, slot_steps, live_ranks, slot_dims,
                lr, beta1, beta2, eps, weight_decay) -> None:
    n = len(params)
    lengths = dict(grads=len(grads), exp_avgs=len(exp_avgs), exp_avg_sqs=len(exp_avg_sqs),
                   slot_steps=len(slot_steps), live_ranks=len(live_ranks), slot_dims=len(slot_dims))
    if any(length != n for length in lengths.values()):
        raise ValueError(f"adam_step_: list lengths differ: params {n}, "
                         + ", ".join(f"{k} {v}" for k, v in lengths.items()))
    for name, value, ok in (("lr", lr, lr >= 0), ("beta1", beta1, 0 <= beta1 < 1), ("beta2", beta2, 0 <= beta2 < 1),
                            ("eps", eps, eps >= 0), ("weight_decay", weight_decay, weight_decay >= 0)):
        if not ok:
            raise ValueError(f"adam_step_: invalid {name} = {value}")
    for i, param in enumerate(params):
        if param.dim() != 2:
            raise ValueError(f"adam_step_: params[{i}] must be a 2-D capacity buffer, got shape {tuple(param.shape)}")
        if slot_dims[i] not in (0, 1):
            raise ValueError(f"adam_step_: slot_dims[{i}] must be 0 (rows are slots) or 1 (columns are slots), "
                             f"got {slot_dims[i]}")
        if param.dtype not in _ADAM_DTYPES:
            raise ValueError(f"adam_step_: params[{i}] has unsupported dtype {param.dtype}")
        expected = (tuple(param.shape), param.dtype, param.device)
        named = [("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])]
        if grads[i] is not None:
            named.append(("grads", grads[i]))
        for name, tensor in named:
            got = (tuple(tensor.shape), tensor.dtype, tensor.device)
            if got != expected:
                raise ValueError(f"adam_step_: {name}[{i}] must match params[{i}] (shape, dtype, device) = "
                                 f"{expected}, got {got}")
        capacity = param.size(slot_dims[i])
        steps = slot_steps[i]
        if tuple(steps.shape) != (capacity,) or steps.dtype != torch.float32 or steps.device != param.device:
            raise ValueError(f"adam_step_: slot_steps[{i}] must be float32 of shape ({capacity},) on {param.device}, "
                             f"got shape {tuple(steps.shape)} dtype {steps.dtype} device {steps.device}")
        live_rank = live_ranks[i]
        if live_rank.dim() != 0 or live_rank.dtype != torch.int64 or live_rank.device != param.device:
            raise ValueError(f"adam_step_: live_ranks[{i}] must be a 0-d int64 tensor on {param.device}, got shape "
                             f"{tuple(live_rank.shape)} dtype {live_rank.dtype} device {live_rank.device}")


def _adam_step_fallback(params, grads, exp_avgs, exp_avg_sqs, slot_steps, live_ranks, slot_dims,
                        lr, beta1, beta2, eps, weight_decay) -> None:
    """Masked whole-buffer update: the live-slot mask is computed on the device (no sync); dead slots
    are written back with their own values, bit-unchanged. Same op sequence as torch.optim.AdamW
    (single_tensor), with the bias corrections per slot in float64 like AdamW's Python scalars.
    Arithmetic in float32, or float64 for float64 buffers (float32 would round them even at lr = 0)."""
    for param, grad, exp_avg, exp_avg_sq, steps, live_rank, slot_dim in zip(
            params, grads, exp_avgs, exp_avg_sqs, slot_steps, live_ranks, slot_dims):
        if grad is None:
            continue
        compute = torch.float64 if param.dtype == torch.float64 else torch.float32
        capacity = param.size(slot_dim)
        live = torch.arange(capacity, device=steps.device) < live_rank.clamp(0, capacity)
        steps.copy_(torch.where(live, steps + 1, steps))
        step = steps.double()
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        slot_shape = (-1, 1) if slot_dim == 0 else (1, -1)
        neg_step_size = (-(lr / bias_correction1)).to(compute).view(slot_shape)
        bias_correction2_sqrt = bias_correction2.sqrt().to(compute).view(slot_shape)
        mask = live.view(slot_shape)

        p = param.to(compute)
        g = grad.to(compute)
        if weight_decay != 0:
            p = p * (1 - lr * weight_decay)
        m = exp_avg.to(compute).lerp(g, 1 - beta1)
        v = torch.addcmul(exp_avg_sq.to(compute) * beta2, g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p = p + neg_step_size * (m / denom)
        param.copy_(torch.where(mask, p.to(param.dtype), param))
        exp_avg.copy_(torch.where(mask, m.to(exp_avg.dtype), exp_avg))
        exp_avg_sq.copy_(torch.where(mask, v.to(exp_avg_sq.dtype), exp_avg_sq))


@torch.no_grad()
def adam_step_(params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]],
               exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
               slot_steps: Sequence[torch.Tensor], live_ranks: Sequence[torch.Tensor], slot_dims: Sequence[int],
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, *,
               backend: str = "auto") -> None:
    """One AdamW step over many 2-D capacity buffers, with a step counter per slot.

    Slot k of params[i] (row k when slot_dims[i] == 0, column k when 1) is updated only when
    k < live_ranks[i] (read on the device); for such a slot, with t = ++slot_steps[i][k]:
    p *= 1 - lr*wd; m = lerp(m, g, 1 - beta1); v = beta2 v + (1 - beta2) g^2;
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps). Entries whose grad is None are
    skipped. Compute in fp32 for fp32/fp16/bf16 buffers, in fp64 for fp64 buffers (moments have the
    param's dtype).
    """
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    slot_steps, live_ranks, slot_dims = list(slot_steps), list(live_ranks), [int(d) for d in slot_dims]
    lr, beta1, beta2, eps, weight_decay = float(lr), float(beta1), float(beta2), float(eps), float(weight_decay)
    _check_adam(params, grads, exp_avgs, exp_avg_sqs, slot_steps, live_ranks, slot_dims,
                lr, beta1, beta2, eps, weight_decay)
    if _use_extension(backend):
        torch.ops.selora_ext.adam_step_(params, grads, exp_avgs, exp_avg_sqs, slot_steps, live_ranks, slot_dims,
                                        lr, beta1, beta2, eps, weight_decay)
    else:
        _adam_step_fallback(params, grads, exp_avgs, exp_avg_sqs, slot_steps, live_ranks, slot_dims,
                            lr, beta1, beta2, eps, weight_decay)
