"""Triton kernels of the SeLoRA linear vs a float64 reference (forward, grad_x, grad_a, grad_b, Fisher).

How this file runs:
- With a GPU (torch.cuda.is_available()): every test runs compiled, in this process, with fp32, fp16 and
  bf16, plus torch.library.opcheck on the ops with CUDA inputs and a torch.compile(mode="reduce-overhead")
  training step that grows within capacity without recompiling.
- Without a GPU: the kernels run under the Triton interpreter, which must be switched on (TRITON_INTERPRET=1)
  before triton is first imported - and the rest of the suite imports triton without it. So on CPU the
  only test collected in the main process, `test_interpreter_suite`, reruns this file in a fresh
  `python -m pytest` subprocess with TRITON_INTERPRET=1 and SELORA_TRITON_INTERPRETER_CHILD=1, where the
  kernel tests run on CPU tensors with fp32 (IEEE dots) and fp16 only (the interpreter's bf16 tl.dot
  multiplies the raw 16-bit patterns) and small shapes. Run the child directly with
      TRITON_INTERPRET=1 SELORA_TRITON_INTERPRETER_CHILD=1 python -m pytest tests/test_triton_kernels.py
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
IN_CHILD = os.environ.get("SELORA_TRITON_INTERPRETER_CHILD") == "1"
RUN_KERNELS = ON_GPU or IN_CHILD
HAVE_TRITON = importlib.util.find_spec("triton") is not None

needs_kernels = pytest.mark.skipif(not (RUN_KERNELS and HAVE_TRITON),
                                   reason="kernel tests run on a GPU or in the interpreter subprocess")
needs_gpu = pytest.mark.skipif(not (ON_GPU and HAVE_TRITON), reason="needs a CUDA GPU")

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# Relative to the largest reference entry: kernels accumulate in fp32 from inputs rounded to the dtype;
# the float64 reference sees the same rounded inputs, so only accumulation and output rounding remain.
REL_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FISHER_REL_TOL = {torch.float32: 5e-5, torch.float16: 2e-4, torch.bfloat16: 2e-4}

# (name, num_samples, tokens per sample, in, out, capacity, live_rank); scaled-down SD shapes and odd sizes.
SHAPES = [
    ("sd_attn_l1_scaled", 2, 16, 40, 40, 15, 4),  # latent tokens, q/k/v 320->320 scaled by 1/8
    ("sd_ff_scaled", 2, 8, 40, 160, 15, 3),  # ff.net.0.proj 320->2560 scaled
    ("text_kv_scaled", 2, 7, 96, 40, 15, 2),  # attn2 k/v 768->320 on 77 text tokens, scaled
    ("odd_sizes", 3, 23, 70, 33, 15, 5),  # nothing a multiple of a block (69 rows, 70 in, 33 out)
    ("rank1", 2, 9, 24, 20, 15, 1),
    ("rank_at_capacity", 2, 9, 24, 20, 15, 15),
    ("capacity31_r_pad32", 2, 10, 36, 28, 31, 31),  # capacity class 32; trial slot is column 31
    ("one_token_per_sample", 6, 1, 20, 24, 15, 3),  # 2-D module input (N, in): one token per sample
    ("tall", 1, 140, 20, 24, 7, 6),  # M > the large-tile threshold (large block table)
]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_case(num_samples, tokens, in_features, out_features, capacity, rank, dtype, seed=0,
              garbage_dead_slots=False):
    """Fresh random inputs rounded to `dtype`. Dead slots are zero, or garbage to test the masking."""
    gen = _generator(seed)
    rows = num_samples * tokens

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)

    x = rand(rows, in_features)
    weight = rand(out_features, in_features, scale=in_features ** -0.5)
    bias = rand(out_features)
    lora_a = rand(capacity, in_features, scale=in_features ** -0.5)
    lora_b = rand(out_features, capacity)
    if not garbage_dead_slots:
        lora_a[rank:] = 0
        lora_b[:, rank:] = 0
    trial_row = rand(in_features, scale=in_features ** -0.5)
    grad_y = rand(rows, out_features)
    live_rank = torch.tensor(rank, dtype=torch.int64, device=DEVICE)
    return dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, trial_row=trial_row,
                grad_y=grad_y, live_rank=live_rank)


def assert_rel_close(actual, expected, tol, what):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= tol * max(scale, 1e-30) or error == 0.0, \
        f"{what}: max error {error:.3e} vs max |ref| {scale:.3e} (rel tol {tol:g})"


def f64(case):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in case.items()}


@pytest.fixture(autouse=True)
def _ieee_fp32():
    # "highest" -> IEEE fp32 dots in the kernels (also the only precision the interpreter models).
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


# ------------------------------------------------------------------------------------------ CPU driver
@pytest.mark.skipif(ON_GPU or IN_CHILD or not HAVE_TRITON, reason="only the CPU parent process drives the "
                                                                  "interpreter subprocess")
def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1", SELORA_TRITON_INTERPRETER_CHILD="1")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider",
                             "-x"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    print(result.stdout[-6000:])
    assert result.returncode == 0, f"interpreter run failed:\n{result.stdout[-8000:]}\n{result.stderr[-3000:]}"


# ------------------------------------------------------------------------------------------ forward
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_forward_matches_float64(shape, dtype):
    from selora_kernels.kernels.selora_linear_forward import selora_linear_forward_triton
    from selora_kernels.ops.reference import forward_reference

    _, num_samples, tokens, in_f, out_f, capacity, rank = shape
    case = make_case(num_samples, tokens, in_f, out_f, capacity, rank, dtype)
    scale = 0.75
    y = selora_linear_forward_triton(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], scale)
    ref = f64(case)
    expected = forward_reference(ref["x"], ref["weight"], ref["bias"], ref["lora_a"], ref["lora_b"], scale)
    assert y.dtype == dtype and y.shape == expected.shape
    assert_rel_close(y, expected, REL_TOL[dtype], "y")


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_without_bias_and_strided_inputs(dtype):
    from selora_kernels.kernels.selora_linear_forward import selora_linear_forward_triton
    from selora_kernels.ops.reference import forward_reference

    case = make_case(3, 11, 36, 26, 15, 6, dtype, seed=3)
    # x as a column slice of a wider buffer, W0 transposed storage, A/B as non-contiguous views
    x = torch.cat([case["x"], case["x"][:, :5]], dim=1)[:, :36]
    weight = case["weight"].t().contiguous().t()
    lora_a = case["lora_a"].t().contiguous().t()
    lora_b = torch.cat([case["lora_b"], case["lora_b"]], dim=1)[:, ::2]
    assert not x.is_contiguous() and not weight.is_contiguous() and not lora_b.is_contiguous()
    y = selora_linear_forward_triton(x, weight, None, lora_a, lora_b, 2.0)
    expected = forward_reference(x.double(), weight.double(), None, lora_a.double(), lora_b.double(), 2.0)
    assert_rel_close(y, expected, REL_TOL[dtype], "y (strided, no bias)")


# ------------------------------------------------------------------------------------------ backward
def _check_backward(case, dtype, num_samples, scale, multiplier, measuring, compute_grad_x, what=""):
    from selora_kernels.kernels.selora_linear_backward import selora_linear_backward_triton
    from selora_kernels.ops.reference import backward_reference

    args = (case["grad_y"], case["x"], case["weight"], case["lora_a"], case["lora_b"], case["trial_row"],
            case["live_rank"])
    out = selora_linear_backward_triton(*args, scale, num_samples, multiplier, measuring, compute_grad_x)
    ref = f64(case)
    expected = backward_reference(ref["grad_y"], ref["x"], ref["weight"], ref["lora_a"], ref["lora_b"],
                                  ref["trial_row"], ref["live_rank"], scale, num_samples, multiplier, measuring,
                                  compute_grad_x)
    grad_x, grad_a, grad_b, fisher = out
    assert grad_a.dtype == case["lora_a"].dtype and grad_b.dtype == case["lora_b"].dtype
    assert fisher.dtype == torch.float32 and fisher.shape == (3, case["lora_a"].shape[0] + 1)
    if compute_grad_x:
        assert grad_x.dtype == dtype
        assert_rel_close(grad_x, expected[0], REL_TOL[dtype], f"grad_x{what}")
    else:
        assert grad_x.numel() == 0
    assert_rel_close(grad_a, expected[1], REL_TOL[dtype], f"grad_a{what}")
    assert_rel_close(grad_b, expected[2], REL_TOL[dtype], f"grad_b{what}")
    if measuring:
        for row, name in ((0, "fisher_a"), (1, "fisher_b")):
            assert_rel_close(fisher[row], expected[3][row], FISHER_REL_TOL[dtype], f"{name}{what}")
        assert fisher[2, 0].item() == num_samples and not fisher[2, 1:].any()
    else:
        assert not fisher.any()
    rank = int(case["live_rank"])
    assert not grad_a[rank:].any() and not grad_b[:, rank:].any(), "dead slots must get exactly zero gradient"
    return out


@needs_kernels
@pytest.mark.parametrize("measuring", [False, True], ids=["plain", "measuring"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_backward_matches_float64(shape, dtype, measuring):
    _, num_samples, tokens, in_f, out_f, capacity, rank = shape
    case = make_case(num_samples, tokens, in_f, out_f, capacity, rank, dtype, seed=1, garbage_dead_slots=True)
    _check_backward(case, dtype, num_samples, 0.5, float(num_samples), measuring, compute_grad_x=True)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_without_grad_x(dtype):
    case = make_case(3, 13, 40, 30, 15, 4, dtype, seed=2, garbage_dead_slots=True)
    for measuring in (False, True):
        _check_backward(case, dtype, 3, 1.5, 1.0, measuring, compute_grad_x=False, what=f" m={measuring}")


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_strided_inputs(dtype):
    case = make_case(2, 17, 30, 44, 15, 5, dtype, seed=4)
    case["x"] = case["x"].t().contiguous().t()  # column-major x
    case["grad_y"] = torch.cat([case["grad_y"], case["grad_y"]], dim=1)[:, 1::2]  # column stride 2
    case["weight"] = case["weight"].t().contiguous().t()
    case["lora_b"] = case["lora_b"].t().contiguous().t()
    assert not case["x"].is_contiguous() and not case["grad_y"].is_contiguous()
    _check_backward(case, dtype, 2, 0.5, 2.0, True, True, " (strided)")


@needs_kernels
def test_backward_is_deterministic():
    case = make_case(4, 33, 40, 36, 15, 6, torch.float32, seed=5)
    from selora_kernels.kernels.selora_linear_backward import selora_linear_backward_triton

    args = (case["grad_y"], case["x"], case["weight"], case["lora_a"], case["lora_b"], case["trial_row"],
            case["live_rank"], 0.5, 4, 4.0, True, True)
    first = selora_linear_backward_triton(*args)
    second = selora_linear_backward_triton(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("rows_per_sample", [33, 2100], ids=["3_shrink_programs", "more_than_a_collect_block"])
def test_backward_counts_non_finite_input_rows(rows_per_sample):
    """While measuring, rows of x holding inf/NaN are counted into fisher[2, 1], as the reference does."""
    from selora_kernels.kernels.selora_linear_backward import selora_linear_backward_triton
    from selora_kernels.fisher_stats import FISHER_COL_NONFINITE
    from selora_kernels.ops.reference import backward_reference

    case = make_case(2, rows_per_sample, 24, 20, 15, 3, torch.float32, seed=11)
    bad_rows = [0, rows_per_sample + 5, 2 * rows_per_sample - 1]
    case["x"][bad_rows[0], 3] = float("nan")
    case["x"][bad_rows[1], 0] = float("inf")
    case["x"][bad_rows[2], 7] = -float("inf")
    args = (case["grad_y"], case["x"], case["weight"], case["lora_a"], case["lora_b"], case["trial_row"],
            case["live_rank"], 0.5, 2, 2.0)
    fisher = selora_linear_backward_triton(*args, True, True)[3]
    expected = backward_reference(*args, True, True)[3]
    assert fisher[2, 0].item() == 2 and fisher[2, FISHER_COL_NONFINITE].item() == len(bad_rows)
    assert expected[2, FISHER_COL_NONFINITE].item() == len(bad_rows)
    assert not fisher[2, FISHER_COL_NONFINITE + 1:].any()
    assert selora_linear_backward_triton(*args, False, True)[3].count_nonzero() == 0  # not measuring
    # a diverged adapter (NaN / overflowing live A rows) with a finite input is not blamed on the input
    case = make_case(2, rows_per_sample, 24, 20, 15, 3, torch.float32, seed=12)
    case["lora_a"][0, 0] = float("nan")
    case["lora_a"][1:3] *= 3e38
    args = (case["grad_y"], case["x"], case["weight"], case["lora_a"], case["lora_b"], case["trial_row"],
            case["live_rank"], 0.5, 2, 2.0)
    assert selora_linear_backward_triton(*args, True, True)[3][2, FISHER_COL_NONFINITE].item() == 0
    assert backward_reference(*args, True, True)[3][2, FISHER_COL_NONFINITE].item() == 0


@needs_kernels
def test_rejects_rows_not_divisible_by_samples():
    from selora_kernels.kernels.selora_linear_backward import selora_linear_backward_triton

    case = make_case(1, 10, 16, 16, 15, 2, torch.float32)
    with pytest.raises(ValueError, match="cannot be split into 3 samples"):
        selora_linear_backward_triton(case["grad_y"], case["x"], case["weight"], case["lora_a"], case["lora_b"],
                                      case["trial_row"], case["live_rank"], 1.0, 3, 3.0, True, True)


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


# ------------------------------------------------------------------------------------------ no recompiles
class _LaunchRecorder:
    """Records the specialisation-relevant part of every launch of a jit function: tensor dtypes and,
    for ints, what Triton specialises on (== 1, divisible by 16) plus every constexpr value."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.keys = set()
        self.launches = 0
        kernel.add_pre_run_hook(self)

    def __call__(self, *args, **kwargs):
        def key(value):
            if isinstance(value, torch.Tensor):
                return ("tensor", value.dtype)
            if isinstance(value, bool) or isinstance(value, str):
                return ("const", value)
            if isinstance(value, int):
                return ("int", value == 1, value % 16 == 0)
            if isinstance(value, float):
                return ("float",)
            return ("other", repr(value))

        self.launches += 1
        self.keys.add((tuple(key(a) for a in args), tuple(sorted((k, key(v)) for k, v in kwargs.items()))))

    def close(self):
        self.kernel.pre_run_hooks.remove(self)


def _jit_cache_size(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if not caches:
        return 0
    return sum(len(entry[0]) for entry in caches.values())


@needs_kernels
def test_rank_change_reuses_the_compiled_kernels():
    """Growth within capacity (rank 1 -> 2 -> 7 -> 15) must launch the same specialisations: the live rank
    is a device tensor, never a Triton int. On a GPU the JIT caches must not grow after the first rank."""
    from selora_kernels.kernels import selora_linear_backward as bwd
    from selora_kernels.kernels import selora_linear_forward as fwd

    kernels = [fwd._fused_lowrank_matmul_kernel, bwd._shrink_kernel, bwd._segment_reduce_kernel,
               bwd._finalize_grad_and_fisher_kernel]
    recorders = [_LaunchRecorder(k) for k in kernels]
    try:
        keys_per_rank = []
        cache_sizes = []
        for rank in (1, 2, 7, 15):
            case = make_case(2, 12, 32, 24, 15, rank, torch.float32, seed=rank)
            fwd.selora_linear_forward_triton(case["x"], case["weight"], case["bias"], case["lora_a"],
                                             case["lora_b"], 0.5)
            _check_backward(case, torch.float32, 2, 0.5, 2.0, True, True, f" rank {rank}")
            keys_per_rank.append([frozenset(r.keys) for r in recorders])
            cache_sizes.append([_jit_cache_size(k) for k in kernels])
        assert all(r.launches > 0 for r in recorders)
        assert all(keys == keys_per_rank[0] for keys in keys_per_rank), "a rank change changed a specialisation"
        if ON_GPU:
            assert all(sizes == cache_sizes[0] for sizes in cache_sizes), f"recompiled: {cache_sizes}"
    finally:
        for recorder in recorders:
            recorder.close()


# ------------------------------------------------------------------------------------------ dispatch
def test_choose_forward_path_table():
    from selora_kernels.ops import cuda_impl

    if not cuda_impl.TRITON_AVAILABLE:
        pytest.skip("triton missing: everything takes the reference path")
    assert cuda_impl.choose_forward_path(616, 768, 320, 15, torch.bfloat16) == "fused"  # text k/v
    assert cuda_impl.choose_forward_path(8, 1280, 320, 15, torch.bfloat16) == "fused"  # time_emb
    assert cuda_impl.choose_forward_path(32768, 320, 320, 15, torch.bfloat16) == "fused"
    assert cuda_impl.choose_forward_path(32768, 1280, 1280, 15, torch.bfloat16) == "merged"
    assert cuda_impl.choose_forward_path(64, 64, 64, 63, torch.float16) == "reference"  # capacity
    assert cuda_impl.choose_forward_path(64, 64, 64, 15, torch.float64) == "reference"
    with pytest.raises(ValueError):
        cuda_impl.force_path("forward", "fast")


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
