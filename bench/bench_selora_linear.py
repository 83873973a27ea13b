"""SeLoRALinear forward and forward+backward against the baselines a strong engineer tries first.

Ours: ``SeLoRALinear`` (the ``selora::linear`` op: the reference implementation on the CPU; on a GPU
whatever ``ops/cuda_impl.py`` dispatches to: fused Triton, merged weight or reference; recorded as `path`).
Baselines, same inputs, same run (why these: docs/kernel_design.md#baselines-the-benchmarks-compare-against):
    frozen     nn.Linear alone (the floor: what the layer costs without an adapter)
    unfused    F.linear(x, W0, b0) + s * F.linear(F.linear(x, A), B)   (A, B at the live rank r)
    peft       peft's LoRA Linear (dropout 0, adapter in the base dtype), rank r
    merged     F.linear(x, W0 + s B A, b0)   (rank-r update of the weight, one GEMM)
    triton_fwd (GPU, fwd only) the Triton forward launcher called directly, when it exists
    ours_fused / ours_merged / ours_reference (GPU) our op under ops.selora_linear.using_path(...): each path of
               the per-shape dispatch, so the dispatch table can be checked against measurements
Modes: fwd = training forward (graph built, x requires grad); fwd_bwd = forward + backward with a fixed
upstream gradient, grads set to None before every call (zero_grad(set_to_none=True)).

Shapes: SD 1.5 on a GPU (bs 8); on the CPU the same layers with fewer tokens (bs 2, 1/4 to 1/16 of the
tokens) so the CPU run stays within minutes.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from bench.sd_shapes import ALPHA, CPU_SHAPES, GPU_SHAPES, RANKS  # noqa: E402

MODES = ["fwd", "fwd_bwd"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _cases():
    cases = []
    for shape in GPU_SHAPES:  # bf16 (training dtype) at every rank; fp32 at r = 4 (the paper trains in fp32)
        for dtype in ("bf16", "fp32"):
            for rank in (RANKS if dtype == "bf16" else [4]):
                for mode in MODES:
                    cases.append(pytest.param("cuda", shape, rank, dtype, mode, marks=pytest.mark.gpu,
                                              id=f"cuda-{shape.name}-r{rank}-{dtype}-{mode}"))
    for shape in CPU_SHAPES:  # every shape at r = 4, the rank sweep on the first one (CPU time)
        for rank in (RANKS if shape is CPU_SHAPES[0] else [4]):
            for mode in MODES:
                cases.append(pytest.param("cpu", shape, rank, "fp32", mode,
                                          id=f"cpu-{shape.name}-r{rank}-fp32-{mode}"))
    return cases


def _triton_forward():
    for module in ("selora_kernels.kernels.selora_linear_forward", "selora_kernels.kernels"):
        try:
            return getattr(importlib.import_module(module), "selora_linear_forward_triton")
        except Exception:  # noqa: BLE001 (a missing launcher is a skipped provider, reported)
            continue
    return None


def _using_path():
    try:
        return importlib.import_module("selora_kernels.ops.selora_linear").using_path
    except Exception:  # noqa: BLE001
        return None


# Our op with its dispatch overridden (GPU): which path the per-shape heuristic should pick.
PATH_VARIANTS = {"ours_fused": "fused", "ours_merged": "merged", "ours_reference": "reference"}


def build_providers(harness, device, shape, rank, dtype, mode, errors):
    """Our module and every baseline on one set of inputs; returns (providers, ours_module)."""
    gen = torch.Generator().manual_seed(1234 + rank)
    base = torch.nn.Linear(shape.d_in, shape.d_out, bias=True)
    with torch.no_grad():
        base.weight.normal_(0, shape.d_in ** -0.5, generator=gen)
        base.bias.normal_(0, 0.02, generator=gen)
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    ours = harness.make_selora(base, rank, ALPHA, generator=gen)
    scale = ours.scale
    lora_a = ours.lora_A[:rank].detach().clone().requires_grad_(True)  # baselines at the live rank
    lora_b = ours.lora_B[:, :rank].detach().clone().requires_grad_(True)
    x = torch.randn(shape.batch, shape.tokens, shape.d_in, generator=gen).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    grad_y = torch.randn(shape.batch, shape.tokens, shape.d_out, generator=gen).to(device=device, dtype=dtype)
    weight, bias = base.weight, base.bias

    def frozen(inp):
        return F.linear(inp, weight, bias)

    def unfused(inp):
        return F.linear(inp, weight, bias) + scale * F.linear(F.linear(inp, lora_a), lora_b)

    def merged(inp):
        return F.linear(inp, weight + scale * (lora_b @ lora_a), bias)

    forwards = {"ours": ours, "frozen": frozen, "unfused": unfused, "merged": merged}
    try:
        peft_layer = harness.make_peft_linear(base, rank, ALPHA, dtype)
        with torch.no_grad():  # same adapter as ours (peft's scaling is alpha / r; ours is alpha / r_init)
            peft_layer.lora_A["default"].weight.copy_(lora_a)
            peft_layer.lora_B["default"].weight.copy_(lora_b * (scale / peft_layer.scaling["default"]))
        forwards["peft"] = peft_layer
    except Exception as error:  # noqa: BLE001
        errors["peft"] = f"{type(error).__name__}: {error}"[:500]
    leaves = {"ours": [x, ours.lora_A, ours.lora_B], "frozen": [x], "unfused": [x, lora_a, lora_b],
              "merged": [x, lora_a, lora_b]}
    if "peft" in forwards:
        layer = forwards["peft"]
        leaves["peft"] = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]

    providers = {}
    for name, forward in forwards.items():
        if mode == "fwd":
            providers[name] = (lambda f=forward: f(x))
        else:
            def step(f=forward, tensors=leaves[name]):
                for tensor in tensors:
                    tensor.grad = None
                f(x).backward(grad_y)
            providers[name] = step
    using_path = _using_path() if device == "cuda" else None
    if device == "cuda" and using_path is None:
        errors["ours_fused"] = "skipped: selora_kernels.ops.selora_linear.using_path not importable"
    elif using_path is not None:
        for name, path in PATH_VARIANTS.items():
            def forced(run=providers["ours"], path=path):
                with using_path(path):
                    return run()
            providers[name] = forced
    if device == "cuda" and mode == "fwd":
        launcher = _triton_forward()
        if launcher is None:
            errors["triton_fwd"] = "skipped: selora_kernels.kernels.selora_linear_forward_triton not importable"
        else:
            x2d = x.detach().reshape(-1, shape.d_in)
            a_cap, b_cap = ours.lora_A.detach(), ours.lora_B.detach()

            def triton_fwd():
                return launcher(x2d, weight, bias, a_cap, b_cap, scale)
            providers["triton_fwd"] = triton_fwd
    return providers, ours


@pytest.mark.parametrize("device,shape,rank,dtype_name,mode", _cases())
def test_selora_linear(harness, request, device, shape, rank, dtype_name, mode, benchmark):
    harness.device_or_skip(device)
    dtype = DTYPES[dtype_name]
    errors: dict = {}
    providers, ours = build_providers(harness, device, shape, rank, dtype, mode, errors)
    # Our path first, alone, so last_paths() describes our call and not a baseline's.
    providers["ours"]()
    harness.sync(device)
    path = harness.op_path(device)
    if isinstance(path, dict) and mode == "fwd":
        path = {"forward": path.get("forward")}  # the backward entry would be a previous case's
    rounds, iterations = (15, 1) if device == "cpu" else (10, 1)
    times = harness.measure(providers, device, rounds=rounds, iterations=iterations, errors=errors)

    def ratio(name, stat="median_ms"):
        if "ours" in times and name in times and times["ours"].get(stat) and times[name].get(stat):
            return times["ours"][stat] / times[name][stat]
        return None

    targets = []
    if device == "cpu":
        # On a shared CPU the fastest rounds are the robust statistic; the median ratio is in `baselines`.
        targets.append(harness.target("cpu_reference_not_slower_than_peft", ratio("peft", "min_ms"), 1.0, "<=",
                                      "CPU reference path time / peft LoRA time (fastest rounds)"))
    elif mode == "fwd":
        if shape.name.startswith("unet64") and rank <= 16:
            value = (1 / ratio("peft")) if ratio("peft") else None
            targets.append(harness.target("fwd_2x_faster_than_peft_at_64x64", value, 2.0, ">=",
                                          "peft forward time / our forward time, 64x64-latent shapes, r <= 16"))
        targets.append(harness.target("fwd_within_1.15x_of_frozen", ratio("frozen"), 1.15, "<=",
                                      "our forward time / frozen nn.Linear forward time"))
    params = {"device": device, "shape": shape._asdict(), "rank": rank, "capacity": ours.capacity,
              "dtype": dtype_name, "mode": mode, "alpha": ALPHA, "scale": ours.scale,
              "tokens": shape.batch * shape.tokens}
    harness.record(request, op="selora_linear", params=params, ours="ours", times=times, path=path,
                   targets=targets, errors=errors, benchmark=benchmark,
                   notes="peft's adapter copied from ours (same function); baselines at the live rank r")
