"""torch.library registration of the SeLoRA ops: opcheck, and torch.compile across a growth."""
from __future__ import annotations

import copy

import pytest
import torch

from selora_kernels import SeLoRALinear, expand_modules
from selora_kernels.ops.selora_linear import linear, linear_backward


def op_inputs(measuring, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m, i, o, cap = 12, 7, 5, 4
    x = torch.randn(m, i, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(o, i, generator=gen, dtype=dtype)
    b = torch.randn(o, generator=gen, dtype=dtype)
    a = torch.randn(cap, i, generator=gen, dtype=dtype)
    a[2:] = 0
    bb = torch.randn(o, cap, generator=gen, dtype=dtype)
    bb[:, 2:] = 0
    trial = torch.randn(i, generator=gen, dtype=dtype)
    live_rank = torch.tensor(2)
    probe = torch.zeros(3, cap + 1, requires_grad=True) if measuring else None
    return (x, w, b, a.requires_grad_(), bb.requires_grad_(), trial, live_rank, probe, 2.0, 3, 3.0, measuring)


@pytest.mark.parametrize("measuring", [False, True])
def test_opcheck_forward_op(measuring):
    x, w, b, a, bb, trial, live_rank, probe, scale, *_ = op_inputs(measuring)
    torch.library.opcheck(linear, (x, w, b, a, bb, scale, live_rank))


@pytest.mark.parametrize("measuring", [False, True])
def test_opcheck_backward_op(measuring):
    x, w, b, a, bb, trial, live_rank, *_ = op_inputs(measuring)
    grad_y = torch.randn(x.shape[0], w.shape[0])
    args = (grad_y, x.detach(), w, a.detach(), bb.detach(), trial, live_rank, 2.0, 3, 3.0, measuring, True)
    torch.library.opcheck(linear_backward, args)


def test_compiled_training_step_survives_growth_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    module = SeLoRALinear(8, 6, capacity=4)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    x = torch.randn(3, 5, 8)
    for step in range(4):
        module.zero_grad()
        compiled(x).square().mean().backward()
        with torch.no_grad():
            module.lora_B[:, : module.rank] += 0.1  # stand-in for an optimizer step
        if step < 3:
            expand_modules([module], seed=step)  # rank 1 -> 4, within capacity
        assert torch.count_nonzero(module.lora_A.grad[module.rank:]) == 0
    assert module.rank == 4
    assert counter.frame_count == 1  # one compilation, no recompilation after the growths
    torch.testing.assert_close(compiled(x), module(x))


def test_measuring_step_compiles_as_one_graph_and_matches_eager():
    """Measuring adds no data-dependent Python (the non-finite check lives in the backward's statistics), so
    a measuring forward+backward traces with fullgraph=True and accumulates the eager statistics."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = SeLoRALinear(8, 6, r_init=2, capacity=4)
    with torch.no_grad():
        module.lora_B[:, :2].normal_()
    eager = copy.deepcopy(module)
    x = torch.randn(3, 5, 8)
    x[1, 2, 3] = float("inf")
    for m in (module, eager):
        m.start_measuring()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    compiled(x).nan_to_num().square().mean().backward()
    eager(x).nan_to_num().square().mean().backward()
    stats, expected = module.fisher_statistics(), eager.fisher_statistics()
    assert stats[2, 0] == 3 and stats[2, 1] == 1  # three samples, one input row holding inf
    torch.testing.assert_close(stats, expected, equal_nan=True)
    with pytest.raises(ValueError, match="1 input rows"):
        module.fisher_scores()
