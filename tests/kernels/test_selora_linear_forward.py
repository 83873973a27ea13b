"""Triton forward kernel of the SeLoRA linear vs the float64 reference (see tests/selora_linear_cases.py for
how it runs on a GPU and, without one, under the Triton interpreter)."""
from __future__ import annotations

import pytest
import torch

# ieee_fp32 is an autouse fixture: imported so that it applies here
from selora_linear_cases import (DTYPES, REL_TOL, SHAPES, assert_rel_close, drives_interpreter, f64, ieee_fp32,
                                 make_case, needs_kernels, run_interpreter_suite)


# ------------------------------------------------------------------------------------------ CPU driver
@drives_interpreter
def test_interpreter_suite():
    run_interpreter_suite(__file__)


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


@needs_kernels
@pytest.mark.parametrize("min_programs", [1, 2, 3, 8], ids=lambda n: f"{n}_programs")
def test_forward_column_groups_match_float64(monkeypatch, min_programs):
    """A program computes the rank product once and covers a group of column tiles: every grouping, the
    last group short or not, gives the same output and the same kept U."""
    from selora_kernels.kernels import selora_linear_forward as fwd
    from selora_kernels.ops.reference import forward_reference

    monkeypatch.setattr(fwd, "target_programs", lambda device: 2 * min_programs)
    case = make_case(1, 20, 24, 5 * 64 - 3, 15, 4, torch.float32, seed=5)  # 1 row tile, 5 column tiles
    y, (u,) = fwd.selora_linear_forward_triton(case["x"], case["weight"], case["bias"], case["lora_a"],
                                               case["lora_b"], 0.5, keep=(case["live_rank"],))
    ref = f64(case)
    expected = forward_reference(ref["x"], ref["weight"], ref["bias"], ref["lora_a"], ref["lora_b"], 0.5)
    assert_rel_close(y, expected, REL_TOL[torch.float32], f"y, {min_programs} programs")
    live = int(case["live_rank"])
    assert_rel_close(u[:, :live], ref["x"] @ ref["lora_a"][:live].T, REL_TOL[torch.float32], "kept U")
    assert not u[:, live:].any()


def test_column_groups_cover_every_tile_once():
    from selora_kernels.kernels.launch_table import column_group

    assert column_group(256, 5, 132) == 5  # SD level 1, bf16: the rank product once per row tile
    assert column_group(64, 10, 132) == 4  # 640 level: 3 groups (4, 4, 2) instead of 10 rank products
    assert column_group(1, 5, 2) == 3 and column_group(1, 5, 3) == 2 and column_group(1, 5, 8) == 1
    assert column_group(1000, 1, 132) == 1
