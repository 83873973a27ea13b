"""Triton backward kernels of the SeLoRA linear vs the float64 reference: grad_x, grad_a, grad_b and the
per-sample Fisher statistics; no recompiles across a rank change (see tests/selora_linear_cases.py for how it
runs on a GPU and, without one, under the Triton interpreter)."""
from __future__ import annotations

import pytest
import torch

# ieee_fp32 is an autouse fixture: imported so that it applies here
from selora_kernels.kernels.launch_table import SMALL_M
from selora_linear_cases import (DTYPES, FISHER_REL_TOL, ON_GPU, REL_TOL, SHAPES, assert_rel_close,
                                 drives_interpreter, f64, ieee_fp32, make_case, needs_kernels,
                                 run_interpreter_suite)  # noqa: F401 (ieee_fp32: autouse fixture)


# ------------------------------------------------------------------------------------------ CPU driver
@drives_interpreter
def test_interpreter_suite():
    run_interpreter_suite(__file__)


# ------------------------------------------------------------------------------------------ backward
def _check_backward(case, dtype, num_samples, scale, multiplier, measuring, compute_grad_x, what="", kept=None):
    from selora_kernels.kernels.selora_linear_backward import selora_linear_backward_triton
    from selora_kernels.ops.reference import backward_reference

    args = (case["grad_y"], case["x"], case["weight"], case["lora_a"], case["lora_b"], case["trial_row"],
            case["live_rank"])
    out = selora_linear_backward_triton(*args, scale, num_samples, multiplier, measuring, compute_grad_x,
                                        kept=kept)
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


def _training_forward(case, scale=0.5, measuring=False):
    """The fused forward of a training step: y and what it keeps for the backward (a measuring step's
    keeps the trial column and the non-finite row counts too)."""
    from selora_kernels.kernels.selora_linear_forward import selora_linear_forward_triton

    keep = (case["live_rank"], case["trial_row"]) if measuring else (case["live_rank"],)
    return selora_linear_forward_triton(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"],
                                        scale, keep=keep)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("measuring", [False, True], ids=["plain", "measuring"])
def test_backward_from_the_forwards_kept_u_matches_float64(shape, dtype, measuring):
    """A training forward keeps U = x A^T (live slots; measuring, the trial column x . trial_row too, and
    the non-finite row counts): y is unchanged, U is the float64 U, and the backward that skips its own
    pass over x matches the reference."""
    from selora_kernels.ops.reference import forward_reference

    _, num_samples, tokens, in_f, out_f, capacity, rank = shape
    if measuring:
        if dtype == torch.float32:
            pytest.skip("a measuring fp32 forward keeps no trial column (launch_table.keeps_trial_column)")
        # it keeps it above the small-M tile only: the same shape with enough samples
        num_samples = num_samples * -(-(SMALL_M + 1) // (num_samples * tokens))
    case = make_case(num_samples, tokens, in_f, out_f, capacity, rank, dtype, seed=3, garbage_dead_slots=True)
    y, kept = _training_forward(case, measuring=measuring)
    ref = f64(case)
    live_a, live_b = ref["lora_a"].clone(), ref["lora_b"].clone()
    live_a[rank:], live_b[:, rank:] = 0, 0  # the masked math: dead slots hold garbage here
    assert_rel_close(y, forward_reference(ref["x"], ref["weight"], ref["bias"], live_a, live_b, 0.5),
                     REL_TOL[dtype], "y")
    low_rank = kept[0]
    expected_u = torch.zeros(low_rank.shape, dtype=torch.float64)
    expected_u[:, :rank] = ref["x"] @ ref["lora_a"][:rank].t()
    if measuring:
        expected_u[:, capacity] = ref["x"] @ ref["trial_row"]
        assert len(kept) == 2 and not kept[1].any()  # finite input: no row counted
    assert_rel_close(low_rank, expected_u, REL_TOL[dtype], "kept U")
    for compute_grad_x in (True, False):
        _check_backward(case, dtype, num_samples, 0.5, float(num_samples), measuring, compute_grad_x,
                        what=f" (kept U, grad_x={compute_grad_x})", kept=kept)


@needs_kernels
def test_kept_u_must_match_the_backward():
    from selora_kernels.kernels.selora_linear_backward import selora_linear_backward_triton

    case = make_case(2, 9, 24, 20, 15, 3, torch.float32, seed=8)
    _, kept = _training_forward(case)
    args = (case["grad_y"], case["x"], case["weight"], case["lora_a"], case["lora_b"], case["trial_row"],
            case["live_rank"], 0.5, 2, 2.0)
    with pytest.raises(ValueError, match="kept forward tensors"):
        selora_linear_backward_triton(*args, True, True, kept=kept)  # measuring needs the trial column
    with pytest.raises(ValueError, match="keeps the trial column for half precision"):
        _training_forward(case, measuring=True)  # fp32, 18 rows: no trial column kept
    case = make_case(8, 9, 24, 20, 15, 3, torch.float16, seed=8)
    _, measuring_kept = _training_forward(case, measuring=True)
    args = (case["grad_y"], case["x"], case["weight"], case["lora_a"], case["lora_b"], case["trial_row"],
            case["live_rank"], 0.5, 8, 8.0)
    with pytest.raises(ValueError, match="kept forward tensors"):
        selora_linear_backward_triton(*args, False, True, kept=measuring_kept)


@needs_kernels
@pytest.mark.parametrize("measuring", [False, True], ids=["plain", "measuring"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_sums_groups_of_row_tiles_into_one_piece(monkeypatch, dtype, measuring):
    """grad_x sums a group of row tiles into one piece per gradient: while measuring, groups stay inside a
    sample (4 samples of 2 row tiles); otherwise the last group may be short (7 tiles and 5 rows)."""
    from selora_kernels.kernels import launch_table
    from selora_kernels.kernels import selora_linear_backward as bwd
    from selora_kernels.kernels.selora_linear_forward import dtype_name

    monkeypatch.setattr(bwd, "target_programs", lambda device: 4)  # 8 row tiles, 1 column tile: groups of 2
    block_m = launch_table.blocks_for("grad_x", dtype_name(dtype), 1000).block_m
    samples, tokens = (4, 2 * block_m) if measuring else (1, 7 * block_m + 5)
    assert launch_table.grad_x_groups(samples * tokens, 20, dtype_name(dtype), tokens, 4) == (2, True)
    _check_backward(make_case(samples, tokens, 20, 24, 15, 5, dtype, seed=11), dtype, samples, 0.5, 2.0,
                    measuring, True)


def test_grad_x_groups_never_cross_a_sample():
    from selora_kernels.kernels.launch_table import grad_x_groups

    # SD level 1, batch 8, bf16 (128-row tiles, 5 column tiles), two waves of an H100: 4 tiles per group
    assert grad_x_groups(32768, 320, "bf16", 32768, 264) == (4, True)
    assert grad_x_groups(32768, 320, "bf16", 4096, 264) == (4, True)
    assert grad_x_groups(3 * 384, 320, "bf16", 384, 8) == (3, True)  # 3 tiles per sample
    assert grad_x_groups(4 * 384, 320, "bf16", 384, 30) == (1, True)  # 3 per sample: 2 would cross
    assert grad_x_groups(616, 768, "bf16", 77, 4) == (1, False)  # text tokens: tiles cross samples
    assert grad_x_groups(100, 64, "bf16", 100, 1) == (1, True)  # one tile


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
@pytest.mark.parametrize("measuring", [False, True], ids=["plain", "measuring"])
def test_backward_writes_everything_it_returns(monkeypatch, measuring):
    """No fill launch for the statistics: with every torch.empty poisoned to NaN (outputs and scratch), the
    results still match the reference and the statistics are exactly zero when not measuring."""
    real_empty = torch.empty

    def poisoned_empty(*shape, **kwargs):
        out = real_empty(*shape, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    case = make_case(3, 21, 40, 36, 15, 4, torch.float32, seed=7, garbage_dead_slots=True)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    for compute_grad_x in (True, False):
        _check_backward(case, torch.float32, 3, 0.5, 3.0, measuring, compute_grad_x, f" x={compute_grad_x}")
        if not measuring:
            _check_backward(case, torch.float32, 3, 0.5, 3.0, measuring, compute_grad_x, f" x={compute_grad_x} kept",
                            kept=_training_forward(case)[1])


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
    # counted by the measuring training forward (half precision) instead of the shrink: the same row
    half = {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in case.items()}
    y, kept = _training_forward(half, measuring=True)
    assert kept[1].sum().item() == len(bad_rows)
    half_args = tuple(a.half() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    kept_fisher = selora_linear_backward_triton(*half_args, True, True, kept=kept)[3]
    assert kept_fisher[2, FISHER_COL_NONFINITE].item() == len(bad_rows)
    finite = torch.ones(y.shape[0], dtype=torch.bool)
    finite[bad_rows] = False
    assert torch.isfinite(y[finite]).all()  # the trial column never reaches y
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

    kernels = [fwd._fused_lowrank_matmul_kernel, bwd._shrink_kernel, bwd._grad_x_reduce_kernel,
               bwd._segment_reduce_kernel, bwd._finalize_grad_and_fisher_kernel]
    recorders = [_LaunchRecorder(k) for k in kernels]
    try:
        keys_per_rank = []
        cache_sizes = []
        for rank in (1, 2, 7, 15):
            case = make_case(2, 12, 32, 24, 15, rank, torch.float32, seed=rank)
            fwd.selora_linear_forward_triton(case["x"], case["weight"], case["bias"], case["lora_a"],
                                             case["lora_b"], 0.5)
            _check_backward(case, torch.float32, 2, 0.5, 2.0, True, True, f" rank {rank}")
            # x without a gradient: P's shrink and the segment reduction take grad_x's place
            _check_backward(case, torch.float32, 2, 0.5, 2.0, False, False, f" rank {rank} without grad_x")
            keys_per_rank.append([frozenset(r.keys) for r in recorders])
            cache_sizes.append([_jit_cache_size(k) for k in kernels])
        assert all(r.launches > 0 for r in recorders)
        assert all(keys == keys_per_rank[0] for keys in keys_per_rank), "a rank change changed a specialisation"
        if ON_GPU:
            assert all(sizes == cache_sizes[0] for sizes in cache_sizes), f"recompiled: {cache_sizes}"
    finally:
        for recorder in recorders:
            recorder.close()
