"""Tests of selora_kernels.ops.capacity: grow_capacity_, expand_slots_, adam_step_ and the extension loader.

Every op test runs on both backends: "extension" (torch.ops.selora_ext from the AOT or JIT build) and
"fallback" (pure PyTorch). The route the extension was loaded by is printed once per session.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from selora_kernels import _extension
from selora_kernels._extension import extension_status, has_extension
from selora_kernels.ops.capacity import adam_step_, expand_slots_, grow_capacity_

from helpers import show_past_capture

REPO_ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ["extension", "fallback"]
# torch.optim.AdamW vs our per-slot step in fp32: same op sequence, differences are FMA/rounding only.
ADAM_FP32_TOL = dict(rtol=1e-6, atol=1e-7)

_show = show_past_capture



@pytest.fixture(scope="module", autouse=True)
def report_extension_route(request):
    start = time.perf_counter()
    route = extension_status()
    elapsed = time.perf_counter() - start
    message = f"selora_ext extension route: {route} (loaded in {elapsed:.1f}s)"
    if route == "fallback":
        message += f"; reasons: {_extension._failures}"
    _show(request, message)
    return route


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "extension" and not has_extension():
        pytest.skip(f"selora_ext extension could not be built or loaded: {_extension._failures}")
    return request.param


def _requires_extension():
    if not has_extension():
        pytest.skip(f"selora_ext extension could not be built or loaded: {_extension._failures}")


# ---------------------------------------------------------------------------------------------------
# grow_capacity_
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32])
def test_grow_capacity_keeps_identity_values_and_zero_fills(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    a_values = (torch.randn(3, 5, generator=gen) * 10).to(dtype)
    b_values = (torch.randn(4, 3, generator=gen) * 10).to(dtype)
    steps_values = torch.arange(1, 4, dtype=dtype)
    if dtype.is_floating_point:
        lora_a = torch.nn.Parameter(a_values.clone())
        lora_b = torch.nn.Parameter(b_values.clone())
    else:
        lora_a, lora_b = a_values.clone(), b_values.clone()
    slot_steps = steps_values.clone()
    ids = [id(lora_a), id(lora_b), id(slot_steps)]

    grow_capacity_([lora_a, lora_b, slot_steps], [0, 1, 0], 8, backend=backend)

    assert [id(lora_a), id(lora_b), id(slot_steps)] == ids
    assert lora_a.shape == (8, 5) and lora_b.shape == (4, 8) and slot_steps.shape == (8,)
    assert lora_a.dtype == lora_b.dtype == slot_steps.dtype == dtype
    if dtype.is_floating_point:
        assert isinstance(lora_a, torch.nn.Parameter) and lora_a.requires_grad
    assert torch.equal(lora_a[:3], a_values) and torch.equal(lora_b[:, :3], b_values)
    assert torch.equal(slot_steps[:3], steps_values)
    assert not lora_a[3:].any() and not lora_b[:, 3:].any() and not slot_steps[3:].any()
    assert lora_a.is_contiguous() and lora_b.is_contiguous()


def test_grow_capacity_equal_size_is_noop(backend):
    tensor = torch.randn(4, 3)
    data_ptr = tensor.data_ptr()
    grow_capacity_([tensor], [0], 4, backend=backend)
    assert tensor.data_ptr() == data_ptr and tensor.shape == (4, 3)


@pytest.mark.parametrize("case, message", [
    ("shrink", r"tensors\[1\] has 4 slots along dim 1 but new_capacity is 3"),
    ("lengths", r"2 tensors but 1 slot_dims"),
    ("dim", r"slot_dims\[1\] = 2 is not a dimension of tensors\[1\]"),
])
def test_grow_capacity_errors(backend, case, message):
    tensors = [torch.zeros(2, 5), torch.zeros(5, 4)]
    slot_dims = {"shrink": [0, 1], "lengths": [0], "dim": [0, 2]}[case]
    with pytest.raises(ValueError, match=message):
        grow_capacity_(tensors, slot_dims, 3, backend=backend)


def test_grow_capacity_raw_op_errors_are_value_errors():
    _requires_extension()
    with pytest.raises(ValueError, match=r"never shrink"):
        torch.ops.selora_ext.grow_capacity_([torch.zeros(4, 2)], [0], 3)


def test_grow_capacity_optimizer_keeps_stepping(backend):
    torch.manual_seed(0)
    lora_a = torch.nn.Parameter(torch.randn(2, 6))
    optimizer = torch.optim.AdamW([lora_a], lr=1e-2, weight_decay=0.1, foreach=False)
    lora_a.grad = torch.randn(2, 6)
    optimizer.step()
    state = optimizer.state[lora_a]
    trained = lora_a.detach().clone()

    grow_capacity_([lora_a, lora_a.grad, state["exp_avg"], state["exp_avg_sq"]], [0, 0, 0, 0], 4,
                   backend=backend)
    assert optimizer.param_groups[0]["params"][0] is lora_a
    assert state["exp_avg"].shape == (4, 6) and lora_a.grad.shape == (4, 6)
    assert torch.equal(lora_a[:2], trained)

    lora_a.grad = torch.cat([torch.randn(2, 6), torch.zeros(2, 6)])
    optimizer.step()
    assert torch.isfinite(lora_a).all()
    assert not torch.equal(lora_a[:2], trained)
    assert not lora_a[2:].any(), "zero slots with zero grads and zero moments must stay zero"


# ---------------------------------------------------------------------------------------------------
# expand_slots_
# ---------------------------------------------------------------------------------------------------
def _make_modules(specs, seed=0):
    """specs: (capacity, in, out, rank, dtype). Returns the four lists and the ranks."""
    gen = torch.Generator().manual_seed(seed)
    lora_a, lora_b, trial_rows, live_ranks, ranks = [], [], [], [], []
    for capacity, in_features, out_features, rank, dtype in specs:
        lora_a.append(torch.randn(capacity, in_features, generator=gen).to(dtype))
        lora_b.append(torch.randn(out_features, capacity, generator=gen).to(dtype))
        trial_rows.append(torch.randn(in_features, generator=gen).to(dtype))
        live_ranks.append(torch.tensor(rank, dtype=torch.int64))
        ranks.append(rank)
    return lora_a, lora_b, trial_rows, live_ranks, ranks


EXPAND_SPECS = [(4, 5, 3, 0, torch.float32), (8, 16, 7, 5, torch.bfloat16), (3, 3, 9, 1, torch.float32)]


def test_expand_slots_writes_and_draws_next_trial_rows(backend):
    lora_a, lora_b, trial_rows, live_ranks, ranks = _make_modules(EXPAND_SPECS)
    before = [(a.clone(), b.clone(), k.clone()) for a, b, k in zip(lora_a, lora_b, trial_rows)]
    seed = 1234
    expand_slots_(lora_a, lora_b, trial_rows, live_ranks, ranks, seed, backend=backend)

    generator = torch.Generator().manual_seed(seed)
    for i, (a, b, trial_row, live_rank, rank) in enumerate(zip(lora_a, lora_b, trial_rows, live_ranks, ranks)):
        a_before, b_before, trial_before = before[i]
        assert torch.equal(a[rank], trial_before), i
        assert not b[:, rank].any(), i
        keep_rows = [k for k in range(a.size(0)) if k != rank]
        assert torch.equal(a[keep_rows], a_before[keep_rows]) and torch.equal(b[:, keep_rows], b_before[:, keep_rows])
        assert live_rank.item() == rank + 1
        bound = math.sqrt(6.0 / a.size(1))
        expected = torch.empty(a.size(1), dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        assert torch.equal(trial_row, expected.to(trial_row.dtype)), i
        assert trial_row.abs().max() <= bound


def test_expand_slots_extension_matches_fallback_bitwise():
    _requires_extension()
    results = {}
    for backend in BACKENDS:
        tensors = _make_modules(EXPAND_SPECS, seed=3)
        expand_slots_(*tensors, seed=2**40 + 7, backend=backend)
        expand_slots_(*tensors[:4], [r + 1 for r in tensors[4]], seed=99, backend=backend)
        results[backend] = tensors[:4]
    for name, ext_list, ref_list in zip(["lora_a", "lora_b", "trial_rows", "live_ranks"],
                                        results["extension"], results["fallback"]):
        for i, (ext, ref) in enumerate(zip(ext_list, ref_list)):
            assert torch.equal(ext, ref), f"{name}[{i}]"


def test_expand_slots_rank_at_capacity_raises(backend):
    lora_a, lora_b, trial_rows, live_ranks, ranks = _make_modules(EXPAND_SPECS)
    ranks[1] = 8
    with pytest.raises(ValueError, match=r"ranks\[1\] = 8 but capacity is 8"):
        expand_slots_(lora_a, lora_b, trial_rows, live_ranks, ranks, 0, backend=backend)


def test_expand_slots_length_mismatch_raises(backend):
    lora_a, lora_b, trial_rows, live_ranks, ranks = _make_modules(EXPAND_SPECS)
    with pytest.raises(ValueError, match=r"list lengths differ"):
        expand_slots_(lora_a, lora_b[:2], trial_rows, live_ranks, ranks, 0, backend=backend)


def test_expand_slots_raw_op_rank_check():
    _requires_extension()
    lora_a, lora_b, trial_rows, live_ranks, ranks = _make_modules(EXPAND_SPECS)
    ranks[2] = 3
    with pytest.raises(ValueError, match=r"ranks\[2\] = 3 but capacity is 3"):
        torch.ops.selora_ext.expand_slots_(lora_a, lora_b, trial_rows, live_ranks, ranks, 0)


def test_expand_slots_on_parameters(backend):
    lora_a = torch.nn.Parameter(torch.zeros(3, 4))
    lora_b = torch.nn.Parameter(torch.ones(5, 3))
    trial_row = torch.ones(4)
    live_rank = torch.tensor(0)
    expand_slots_([lora_a], [lora_b], [trial_row], [live_rank], [0], 5, backend=backend)
    assert torch.equal(lora_a[0], torch.ones(4)) and not lora_b[:, 0].any() and live_rank.item() == 1


# ---------------------------------------------------------------------------------------------------
# adam_step_
# ---------------------------------------------------------------------------------------------------
def _slot(tensor, slot_dim, k):
    return tensor[k] if slot_dim == 0 else tensor[:, k]


@pytest.mark.parametrize("slot_dim", [0, 1])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_step_slot_moves_like_fresh_adamw(backend, slot_dim, weight_decay):
    """A slot that goes live at step s moves exactly as torch.optim.AdamW on a fresh tensor would."""
    lr, betas, eps = 3e-3, (0.9, 0.999), 1e-8
    capacity, per_slot, n_steps = 6, 7, 12
    live_schedule = {0: 2, 3: 3, 6: 5}  # step index -> live rank from that step on (slot 5 never lives)
    gen = torch.Generator().manual_seed(11)
    shape = (capacity, per_slot) if slot_dim == 0 else (per_slot, capacity)
    param = torch.randn(shape, generator=gen)
    initial = param.clone()
    exp_avg, exp_avg_sq = torch.zeros(shape), torch.zeros(shape)
    slot_steps = torch.zeros(capacity)
    live_rank = torch.tensor(0)

    references = {}  # slot -> (standalone tensor, AdamW)
    for step in range(n_steps):
        if step in live_schedule:
            live_rank.fill_(live_schedule[step])
        live = int(live_rank)
        for k in range(live):
            if k not in references:
                standalone = torch.nn.Parameter(_slot(param, slot_dim, k).clone())
                references[k] = (standalone, torch.optim.AdamW([standalone], lr=lr, betas=betas, eps=eps,
                                                               weight_decay=weight_decay, foreach=False))
        grad = torch.randn(shape, generator=gen)  # dead slots get gradients too: they must be ignored
        adam_step_([param], [grad], [exp_avg], [exp_avg_sq], [slot_steps], [live_rank], [slot_dim],
                   lr, betas[0], betas[1], eps, weight_decay, backend=backend)
        for k, (standalone, optimizer) in references.items():
            standalone.grad = _slot(grad, slot_dim, k).clone()
            optimizer.step()

    for k in range(capacity):
        if k in references:
            standalone, optimizer = references[k]
            torch.testing.assert_close(_slot(param, slot_dim, k), standalone.detach(), **ADAM_FP32_TOL,
                                       msg=lambda m, k=k: f"slot {k}: {m}")
            state = optimizer.state[standalone]
            torch.testing.assert_close(_slot(exp_avg, slot_dim, k), state["exp_avg"], **ADAM_FP32_TOL)
            torch.testing.assert_close(_slot(exp_avg_sq, slot_dim, k), state["exp_avg_sq"], **ADAM_FP32_TOL)
            assert slot_steps[k].item() == state["step"].item()
        else:
            assert torch.equal(_slot(param, slot_dim, k), _slot(initial, slot_dim, k)), f"dead slot {k} moved"
            assert not _slot(exp_avg, slot_dim, k).any() and not _slot(exp_avg_sq, slot_dim, k).any()
            assert slot_steps[k].item() == 0
    assert slot_steps.tolist() == [12, 12, 9, 6, 6, 0]


def test_adam_step_skips_entries_without_grad(backend):
    params = [torch.randn(3, 4), torch.randn(4, 3)]
    before = [p.clone() for p in params]
    moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    slot_steps = [torch.zeros(3), torch.zeros(3)]
    live_ranks = [torch.tensor(2), torch.tensor(3)]
    adam_step_(params, [None, torch.ones(4, 3)], moments[0], moments[1], slot_steps, live_ranks, [0, 1],
               1e-2, 0.9, 0.999, 1e-8, 0.0, backend=backend)
    assert torch.equal(params[0], before[0]) and not slot_steps[0].any()
    assert not torch.equal(params[1], before[1]) and slot_steps[1].tolist() == [1, 1, 1]


def _adam_problem(dtypes, seed=0, capacity=5):
    gen = torch.Generator().manual_seed(seed)
    problem = dict(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[], slot_steps=[], live_ranks=[], slot_dims=[])
    for i, dtype in enumerate(dtypes):
        slot_dim = i % 2
        shape = (capacity, 9 + i) if slot_dim == 0 else (7 + i, capacity)
        problem["params"].append(torch.randn(shape, generator=gen).to(dtype))
        problem["grads"].append(torch.randn(shape, generator=gen).to(dtype))
        problem["exp_avgs"].append((torch.randn(shape, generator=gen) * 0.1).to(dtype))
        problem["exp_avg_sqs"].append((torch.rand(shape, generator=gen) * 0.01).to(dtype))
        problem["slot_steps"].append(torch.randint(0, 20, (capacity,), generator=gen).float())
        problem["live_ranks"].append(torch.tensor(i % (capacity + 1)))
        problem["slot_dims"].append(slot_dim)
    return problem


def _clone_problem(problem):
    return {k: [t.clone() if isinstance(t, torch.Tensor) else t for t in v] for k, v in problem.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_adam_step_extension_matches_fallback(dtype):
    _requires_extension()
    problem = _adam_problem([dtype] * 7, seed=5)
    results = {}
    for backend in BACKENDS:
        state = _clone_problem(problem)
        for _ in range(3):
            adam_step_(**state, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01, backend=backend)
        results[backend] = state
    # fp32: identical math up to rounding; fp16/bf16: both compute in fp32 and round once per store, so
    # at most one ulp of the storage type apart.
    tol = ADAM_FP32_TOL if dtype == torch.float32 else dict(rtol=torch.finfo(dtype).eps, atol=1e-5)
    for name in ("params", "exp_avgs", "exp_avg_sqs"):
        for i, (ext, ref) in enumerate(zip(results["extension"][name], results["fallback"][name])):
            torch.testing.assert_close(ext.float(), ref.float(), **tol, msg=lambda m, n=name, i=i: f"{n}[{i}]: {m}")
    for i, (ext, ref) in enumerate(zip(results["extension"]["slot_steps"], results["fallback"]["slot_steps"])):
        assert torch.equal(ext, ref), f"slot_steps[{i}]"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adam_step_low_precision_tracks_fp32(backend, dtype):
    problem = _adam_problem([dtype] * 4, seed=9)
    reference = {k: [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2 else
                     (t.clone() if isinstance(t, torch.Tensor) else t) for t in v] for k, v in problem.items()}
    adam_step_(**problem, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, backend=backend)
    adam_step_(**reference, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, backend="fallback")
    eps = torch.finfo(dtype).eps
    for i, (low, ref) in enumerate(zip(problem["params"], reference["params"])):
        assert low.dtype == dtype
        torch.testing.assert_close(low.float(), ref, rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize("case, message", [
    ("not_2d", r"params\[1\] must be a 2-D capacity buffer, got shape \(5,\)"),
    ("slot_dim", r"slot_dims\[0\] must be 0 .* got 2"),
    ("lengths", r"list lengths differ: params 2, grads 1"),
    ("steps", r"slot_steps\[1\] must be float32 of shape"),
])
def test_adam_step_errors(backend, case, message):
    problem = _adam_problem([torch.float32] * 2)
    if case == "not_2d":
        problem["params"][1] = torch.zeros(5)
    elif case == "slot_dim":
        problem["slot_dims"][0] = 2
    elif case == "lengths":
        problem["grads"] = problem["grads"][:1]
    elif case == "steps":
        problem["slot_steps"][1] = torch.zeros(4)
    with pytest.raises(ValueError, match=message):
        adam_step_(**problem, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, backend=backend)


def test_adam_step_raw_op_validates():
    _requires_extension()
    problem = _adam_problem([torch.float32] * 2)
    problem["params"][1] = torch.zeros(3, 4, 5)
    with pytest.raises(ValueError, match=r"params\[1\] must be a 2-D capacity buffer"):
        torch.ops.selora_ext.adam_step_(*problem.values(), 1e-3, 0.9, 0.999, 1e-8, 0.0)


def test_adam_step_opcheck():
    """Schema / fake-tensor / functionalization checks of the registered operators (torchao style)."""
    _requires_extension()
    problem = _adam_problem([torch.float32] * 3)
    torch.library.opcheck(torch.ops.selora_ext.adam_step_.default,
                          (*problem.values(), 1e-3, 0.9, 0.999, 1e-8, 0.01))
    lora_a, lora_b, trial_rows, live_ranks, ranks = _make_modules(EXPAND_SPECS)
    torch.library.opcheck(torch.ops.selora_ext.expand_slots_.default,
                          (lora_a, lora_b, trial_rows, live_ranks, ranks, 17))


def test_grow_capacity_opcheck_and_clear_error_under_compile():
    """grow_capacity_ resizes its inputs: schema, autograd registration and fake tensors check out; a traced
    graph cannot hold a resize (aot_dispatch fails by design), so under torch.compile it raises clearly."""
    _requires_extension()
    tensors = [torch.randn(3, 4), torch.randn(5, 3)]
    torch.library.opcheck(torch.ops.selora_ext.grow_capacity_.default, (tensors, [0, 1], 7),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def grow(a, b):
        grow_capacity_([a, b], [0, 1], 7)
        return a.sum()

    with pytest.raises(Exception, match="cannot run inside torch.compile"):
        torch.compile(grow, backend="eager", fullgraph=True)(torch.randn(3, 4), torch.randn(5, 3))


# ---------------------------------------------------------------------------------------------------
# The loader (selora_kernels._extension)
# ---------------------------------------------------------------------------------------------------
_SMOKE_SCRIPT = textwrap.dedent("""
    import sys, warnings
    {prelude}
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        from selora_kernels._extension import extension_status, has_extension
        from selora_kernels.ops.capacity import adam_step_, expand_slots_, grow_capacity_
        for _ in range(2):
            a, b = torch.nn.Parameter(torch.randn(2, 4)), torch.nn.Parameter(torch.zeros(3, 2))
            grow_capacity_([a, b], [0, 1], 3)
            trial, live = torch.randn(4), torch.tensor(2)
            expand_slots_([a], [b], [trial], [live], [2], seed=1)
            steps, m, v = torch.zeros(3), torch.zeros(3, 4), torch.zeros(3, 4)
            adam_step_([a], [torch.ones(3, 4)], [m], [v], [steps], [live], [0], 1e-2, 0.9, 0.999, 1e-8, 0.0)
            assert steps.tolist() == [1.0, 1.0, 1.0], steps
    ours = [w for w in caught if "selora_kernels" in str(w.message)]
    print("STATUS", extension_status(), has_extension())
    print("WARNINGS", len(ours))
    for w in ours:
        print("MESSAGE", w.message)
""")


def _run_smoke(env_updates, prelude="", timeout=600):
    env = dict(os.environ)
    env.update(env_updates)
    script = _SMOKE_SCRIPT.format(prelude=prelude)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    return lines, result


def test_loader_off_warns_once_and_works():
    lines, result = _run_smoke({_extension.EXTENSION_ENV: "off"})
    assert lines["STATUS"] == "fallback False", result.stdout
    assert lines["WARNINGS"] == "1", result.stdout


def test_loader_auto_without_aot_and_compiler_falls_back(tmp_path):
    """No selora_kernels._C and no ninja / compiler on PATH: the package still imports and works."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    prelude = "sys.modules['selora_kernels._C'] = None  # makes `import selora_kernels._C` fail"
    lines, result = _run_smoke({_extension.EXTENSION_ENV: "auto", "PATH": str(empty_bin), "CXX": "c++"},
                               prelude=prelude)
    assert lines["STATUS"] == "fallback False", result.stdout
    assert lines["WARNINGS"] == "1", result.stdout
    assert "aot:" in lines["MESSAGE"] and "jit:" in lines["MESSAGE"], result.stdout


def test_loader_forced_aot_without_module_raises():
    prelude = "import sys\nsys.modules['selora_kernels._C'] = None"
    script = prelude + "\nfrom selora_kernels._extension import extension_status\nextension_status()\n"
    env = dict(os.environ, **{_extension.EXTENSION_ENV: "aot"})
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and "ImportError: SELORA_EXTENSION=aot" in result.stderr, result.stderr


def test_loader_rejects_unknown_mode(monkeypatch):
    monkeypatch.setenv(_extension.EXTENSION_ENV, "sometimes")
    with pytest.raises(ValueError, match="SELORA_EXTENSION='sometimes'"):
        _extension._mode()


def test_loader_jit_route(request):
    """SELORA_EXTENSION=jit builds csrc/ with torch.utils.cpp_extension.load (cached) and matches the fallback.

    First run on a 2-core machine: about a minute; afterwards the cached library loads in seconds."""
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        pytest.skip("ninja not available: no JIT route")
    start = time.perf_counter()
    lines, result = _run_smoke({_extension.EXTENSION_ENV: "jit"})
    elapsed = time.perf_counter() - start
    _show(request, f"\nJIT route: status {lines['STATUS']!r}, build/load + smoke test {elapsed:.1f}s")
    assert lines["STATUS"] == "jit True", result.stdout + result.stderr
    assert lines["WARNINGS"] == "0", result.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA kernels are only compile-checked")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ops_match_cpu_fallback(dtype):
    """On a GPU machine: adam_step_ / expand_slots_ / grow_capacity_ on CUDA tensors match the CPU fallback."""
    _requires_extension()
    problem = _adam_problem([dtype] * 20, seed=4)  # 20 tensors: more than one multi-tensor launch chunk
    on_gpu = {k: [t.cuda() if isinstance(t, torch.Tensor) else t for t in v] for k, v in problem.items()}
    for _ in range(3):
        adam_step_(**on_gpu, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01, backend="extension")
        adam_step_(**problem, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01, backend="fallback")
    tol = ADAM_FP32_TOL if dtype == torch.float32 else dict(rtol=torch.finfo(dtype).eps, atol=1e-5)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "slot_steps"):
        for i, (gpu, cpu) in enumerate(zip(on_gpu[name], problem[name])):
            torch.testing.assert_close(gpu.cpu().float(), cpu.float(), **tol, msg=lambda m, n=name, i=i: f"{n}[{i}]: {m}")

    cpu_modules = _make_modules(EXPAND_SPECS, seed=8)
    gpu_modules = [[t.cuda() for t in ts] for ts in cpu_modules[:4]] + [cpu_modules[4]]
    expand_slots_(*cpu_modules, seed=5, backend="fallback")
    expand_slots_(*gpu_modules, seed=5, backend="extension")
    for cpu_list, gpu_list in zip(cpu_modules[:4], gpu_modules[:4]):
        for cpu, gpu in zip(cpu_list, gpu_list):
            assert torch.equal(gpu.cpu(), cpu)
    weight = torch.nn.Parameter(torch.randn(3, 4, device="cuda"))
    grow_capacity_([weight], [0], 5, backend="extension")
    assert weight.shape == (5, 4) and not weight[3:].any()
