"""The SeLoRA linear op's dispatch on CUDA tensors: the per-shape path table, every forward path against the
float64 reference, leading shapes through cuda_impl, and on a GPU the module's fused path, opcheck and a
compiled training step across a growth (see tests/selora_linear_cases.py for how it runs without a GPU)."""
from __future__ import annotations

import pytest
import torch

# ieee_fp32 is an autouse fixture: imported so that it applies here
from selora_linear_cases import (DTYPES, FISHER_REL_TOL, REL_TOL, assert_rel_close, drives_interpreter, f64,
                                 ieee_fp32, make_case, needs_gpu, needs_kernels, run_interpreter_suite)


# ------------------------------------------------------------------------------------------ CPU driver
@drives_interpreter
def test_interpreter_suite():
    run_interpreter_suite(__file__)


# ------------------------------------------------------------------------------------------ leading shapes
@needs_kernels
@pytest.mark.parametrize("leading", [(3, 7), (5,)], ids=["N_L_in", "N_in"])
def test_leading_shapes_through_the_cuda_impl(leading):
    """(N, L, in) and (N, in) module inputs as the op sees them: flattened rows, N samples."""
    from selora_kernels.ops import cuda_impl
    from selora_kernels.ops.reference import backward_reference, forward_reference

    dtype = torch.float32
    num_samples = leading[0]
    tokens = leading[1] if len(leading) > 1 else 1
    case = make_case(num_samples, tokens, 24, 20, 15, 3, dtype, seed=6)
    x3 = case["x"].reshape(*leading, 24)
    flat = x3.reshape(-1, 24)
    cuda_impl.force_path("forward", "fused")
    try:
        y = cuda_impl.forward_cuda(flat, case["weight"], case["bias"], case["lora_a"], case["lora_b"], 0.5,
                                   case["live_rank"])
    finally:
        cuda_impl.force_path("forward", None)
    assert cuda_impl.last_paths()["forward"] == "fused"
    ref = f64(case)
    assert_rel_close(y.reshape(*leading, 20), forward_reference(
        ref["x"], ref["weight"], ref["bias"], ref["lora_a"], ref["lora_b"], 0.5).reshape(*leading, 20),
        REL_TOL[dtype], "y")
    out = cuda_impl.backward_cuda(case["grad_y"], flat, case["weight"], case["lora_a"], case["lora_b"],
                                  case["trial_row"], case["live_rank"], 0.5, num_samples, float(num_samples),
                                  True, True)
    assert cuda_impl.last_paths()["backward"] == "fused"
    expected = backward_reference(ref["grad_y"], ref["x"], ref["weight"], ref["lora_a"], ref["lora_b"],
                                  ref["trial_row"], ref["live_rank"], 0.5, num_samples, float(num_samples),
                                  True, True)
    for got, want, name in zip(out, expected, ("grad_x", "grad_a", "grad_b", "fisher")):
        assert_rel_close(got, want, FISHER_REL_TOL[dtype] if name == "fisher" else REL_TOL[dtype], name)


# ------------------------------------------------------------------------------------------ dispatch
def test_choose_forward_path_table():
    from selora_kernels.ops import cuda_impl

    if not cuda_impl.TRITON_AVAILABLE:
        pytest.skip("triton missing: everything takes the reference path")
    assert cuda_impl.choose_forward_path(616, 768, 320, 15, torch.bfloat16) == "fused"  # text k/v
    assert cuda_impl.choose_forward_path(8, 1280, 320, 15, torch.bfloat16) == "fused"  # time_emb
    assert cuda_impl.choose_forward_path(32768, 320, 320, 15, torch.bfloat16) == "fused"
    assert cuda_impl.choose_forward_path(32768, 1280, 1280, 15, torch.bfloat16) == "merged"
    # a training forward keeps U for the fused backward (which then skips its pass over x): fused
    assert cuda_impl.choose_forward_path(32768, 1280, 1280, 15, torch.bfloat16, training=True) == "fused"
    assert cuda_impl.choose_forward_path(64, 64, 64, 63, torch.float16, training=True) == "reference"
    assert cuda_impl.choose_forward_path(64, 64, 64, 63, torch.float16) == "reference"  # capacity
    assert cuda_impl.choose_forward_path(64, 64, 64, 15, torch.float64) == "reference"
    with pytest.raises(ValueError):
        cuda_impl.force_path("forward", "fast")


def test_using_path_forces_both_ops_and_restores():
    from selora_kernels.ops import cuda_impl
    from selora_kernels.ops.selora_linear import using_path

    if not cuda_impl.TRITON_AVAILABLE:
        pytest.skip("triton missing: everything takes the reference path")

    def paths():
        return (cuda_impl.choose_forward_path(616, 768, 320, 15, torch.bfloat16),
                cuda_impl.choose_backward_path(15, torch.bfloat16, True))

    assert paths() == ("fused", "fused")
    with using_path("merged"):
        assert paths() == ("merged", "fused")  # merged is a forward path only
        with using_path("reference"):
            assert paths() == ("reference", "reference")
        assert paths() == ("merged", "fused")
    assert paths() == ("fused", "fused")
    with pytest.raises(ValueError, match="path must be one of"):
        with using_path("fast"):
            pass
    assert paths() == ("fused", "fused")


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_and_reference_paths_match(dtype):
    from selora_kernels.ops import cuda_impl
    from selora_kernels.ops.reference import forward_reference

    case = make_case(2, 9, 24, 20, 15, 4, dtype, seed=8)
    args = (case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], 0.5, case["live_rank"])
    ref = f64(case)
    expected = forward_reference(ref["x"], ref["weight"], ref["bias"], ref["lora_a"], ref["lora_b"], 0.5)
    try:
        for path in cuda_impl.FORWARD_PATHS:
            cuda_impl.force_path("forward", path)
            y = cuda_impl.forward_cuda(*args)
            assert cuda_impl.last_paths()["forward"] == path
            assert y.dtype == dtype
            assert_rel_close(y, expected, REL_TOL[dtype], f"y ({path})")
    finally:
        cuda_impl.force_path("forward", None)


# ------------------------------------------------------------------------------------------ GPU only
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_module_on_gpu_uses_the_fused_kernels(dtype):
    from selora_kernels import SeLoRALinear
    from selora_kernels.ops import cuda_impl

    torch.manual_seed(0)
    module = SeLoRALinear(40, 36, r_init=3, device="cuda", dtype=dtype)
    with torch.no_grad():
        module.lora_B[:, :3].normal_()
    module.start_measuring()
    x = torch.randn(2, 9, 40, device="cuda", dtype=dtype, requires_grad=True)
    y = module(x)
    assert cuda_impl.last_paths()["forward"] == "fused"
    y.square().mean().backward()
    assert cuda_impl.last_paths()["backward"] == "fused"
    stats = module.fisher_statistics()
    assert stats[2, 0].item() == 2 and stats[1, module.capacity].item() > 0


@needs_gpu
def test_opcheck_on_cuda():
    from selora_kernels.ops.selora_linear import linear, linear_backward

    for dtype in (torch.float32, torch.bfloat16):
        case = make_case(2, 8, 32, 24, 15, 3, dtype)
        x = case["x"].clone().requires_grad_(True)
        lora_a = case["lora_a"].clone().requires_grad_(True)
        lora_b = case["lora_b"].clone().requires_grad_(True)
        torch.library.opcheck(linear, (x, case["weight"], case["bias"], lora_a, lora_b, 0.5, case["live_rank"]))
        torch.library.opcheck(linear_backward, (case["grad_y"], case["x"], case["weight"], case["lora_a"],
                                                case["lora_b"], case["trial_row"], case["live_rank"], 0.5,
                                                2, 2.0, True, True))


@needs_gpu
def test_compiled_training_step_survives_growth_without_recompiling():
    """torch.compile(mode="reduce-overhead") training step; a growth within capacity changes no shape and
    no guard (the rank lives in a device tensor), so Dynamo must not recompile."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from selora_kernels import SeLoRALinear, expand_modules

    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    module = SeLoRALinear(64, 48, r_init=1, device="cuda", dtype=torch.bfloat16)
    optimizer = torch.optim.SGD([module.lora_A, module.lora_B], lr=1e-2)
    x = torch.randn(4, 16, 64, device="cuda", dtype=torch.bfloat16)

    def step(inputs):
        loss = module(inputs).float().square().mean()
        loss.backward()
        return loss.detach()

    compiled = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):
        compiled(x)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    frames_before = counters["stats"]["unique_graphs"]
    expand_modules([module], seed=1)  # rank 1 -> 2 within capacity 15
    assert module.rank == 2
    for _ in range(3):
        loss = compiled(x)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    assert torch.isfinite(loss).all()
    assert counters["stats"]["unique_graphs"] == frames_before, "growth within capacity recompiled"


# ------------------------------------------------------------------------------------------ kept U
@needs_kernels
@pytest.mark.parametrize("measuring", [False, True], ids=["plain", "measuring"])
def test_function_keeps_u_from_the_forward_for_the_fused_backward(monkeypatch, measuring):
    """SeLoRALinearFunction on the fused path: a training forward keeps U (measuring, with the trial column
    and the non-finite row counts) and the backward uses it (no second pass over x). Gradients and Fisher
    statistics match the float64 reference path's; under no_grad nothing is kept. (CPU tensors here:
    `keeps_forward_tensors` is widened to them, as the interpreter runs them.)"""
    from selora_kernels.ops import cuda_impl, selora_linear
    from selora_kernels.ops.selora_linear import SeLoRALinearFunction

    # fp16, 66 rows: a measuring forward keeps the trial column too (launch_table.keeps_trial_column)
    case = make_case(3, 22, 24, 20, 15, 4, torch.float16, seed=9)

    def run(case):
        leaves = {k: case[k].clone().requires_grad_(k in ("x", "lora_a", "lora_b")) for k in ("x", "lora_a", "lora_b")}
        probe = torch.zeros(3, 16, requires_grad=True)  # fp32 statistics
        y = SeLoRALinearFunction.apply(leaves["x"], case["weight"], case["bias"], leaves["lora_a"], leaves["lora_b"],
                                       case["trial_row"], case["live_rank"], probe if measuring else None, 0.5, 3,
                                       3.0, measuring, torch.is_grad_enabled())
        (y * case["grad_y"][:, :20]).sum().backward()
        return y.detach(), leaves["x"].grad, leaves["lora_a"].grad, leaves["lora_b"].grad, probe.grad

    expected = run(f64(case))  # CPU float64 tensors: the reference path
    calls = []
    real_backward = cuda_impl.backward_cuda

    def recording_backward(*args, kept=None, **kwargs):
        calls.append(kept)
        return real_backward(*args, kept=kept, **kwargs)

    monkeypatch.setattr(selora_linear, "keeps_forward_tensors", lambda x, needs: bool(needs[3] or needs[4]))
    monkeypatch.setattr(selora_linear, "backward_cuda", recording_backward)
    cuda_impl.force_path("forward", "fused")
    try:
        kept_run = run(case)
        with torch.no_grad():  # inference keeps nothing: the forward returns y alone
            y = SeLoRALinearFunction.apply(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"],
                                           case["trial_row"], case["live_rank"], None, 0.5, 3, 3.0, False,
                                           torch.is_grad_enabled())
    finally:
        cuda_impl.force_path("forward", None)
    assert len(calls) == 1 and len(calls[0]) == 1 + measuring and calls[0][0].shape == (66, 16)
    assert_rel_close(y, expected[0], REL_TOL[torch.float16], "no_grad y")
    for got, want, name in zip(kept_run, expected, ("y", "grad_x", "grad_a", "grad_b", "fisher")):
        if want is None:
            assert got is None, name
        else:
            assert_rel_close(got, want, FISHER_REL_TOL[torch.float16] if name == "fisher" else REL_TOL[torch.float16],
                             name)
