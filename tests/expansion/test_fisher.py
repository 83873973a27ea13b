"""Per-sample Fisher in the ordinary backward against a torch.func (vmap over grad) oracle, float64."""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

from selora_kernels import SeLoRALinear
from selora_kernels.fisher_stats import FISHER_COL_NONFINITE, FISHER_ROW_A, FISHER_ROW_B, FISHER_ROW_COUNT

from helpers import fill_live_slots


def make_module(in_f, out_f, capacity, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    module = SeLoRALinear(in_f, out_f, capacity=capacity, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.randn(out_f, in_f, generator=gen, dtype=torch.float64))
        module.bias.copy_(torch.randn(out_f, generator=gen, dtype=torch.float64))
        module.trial_row.copy_(torch.randn(in_f, generator=gen, dtype=torch.float64))
    fill_live_slots(module, rank, gen)
    return module, gen


def oracle_fisher(module, x, target, reduction):
    """Eq. 3 per slot, from per-sample gradients of the per-sample losses (vmap over grad)."""
    r, w, bias, s = module.rank, module.weight.detach(), module.bias.detach(), module.scale
    a_ext = torch.cat([module.lora_A.detach()[:r], module.trial_row.detach()[None]])
    b_ext = torch.cat([module.lora_B.detach()[:, :r], torch.zeros(module.out_features, 1, dtype=x.dtype)], 1)

    def sample_loss(a, b, x_i, t_i):
        y = x_i @ w.t() + bias + s * (x_i @ a.t()) @ b.t()
        return 0.5 * ((y - t_i) ** 2).mean() if reduction == "mean" else 0.5 * ((y - t_i) ** 2).sum()

    g_a, g_b = vmap(grad(sample_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(a_ext, b_ext, x, target)
    fisher_a = g_a.square().sum(dim=2).mean(dim=0)  # (r + 1,)
    fisher_b = g_b.square().sum(dim=1).mean(dim=0)
    return fisher_a, fisher_b


def batch_loss(y, target, reduction):
    per_sample = 0.5 * ((y - target) ** 2).flatten(1).mean(1) if reduction == "mean" else \
        0.5 * ((y - target) ** 2).flatten(1).sum(1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


@pytest.mark.parametrize("x_shape", [(6, 5, 9), (7, 9), (3, 2, 4, 9)])
@pytest.mark.parametrize("rank", [1, 3, 6])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fisher_matches_vmap_oracle(x_shape, rank, reduction):
    module, gen = make_module(9, 4, capacity=6, rank=rank, seed=sum(x_shape) * 10 + rank)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64)
    target = torch.randn(*x_shape[:-1], 4, generator=gen, dtype=torch.float64)
    module.start_measuring(reduction=reduction)
    batch_loss(module(x), target, reduction).backward()
    stats = module.fisher_statistics()
    n = x_shape[0]
    assert stats[FISHER_ROW_COUNT, 0] == n
    fisher_a, fisher_b = oracle_fisher(module, x, target, reduction)
    cap = module.capacity
    ours_a = torch.cat([stats[FISHER_ROW_A, :rank], stats[FISHER_ROW_A, cap:]]) / n
    ours_b = torch.cat([stats[FISHER_ROW_B, :rank], stats[FISHER_ROW_B, cap:]]) / n
    torch.testing.assert_close(ours_a, fisher_a, rtol=1e-10, atol=1e-300)
    torch.testing.assert_close(ours_b, fisher_b, rtol=1e-10, atol=1e-300)
    assert ours_b[-1] > 0 and ours_a[-1] == 0  # the trial slot: only its B column carries information
    assert torch.count_nonzero(stats[:2, rank:cap]) == 0  # dead slots
    scores = module.fisher_scores()
    original = float(fisher_a[:rank].sum() + fisher_b[:rank].sum())
    expanded = float(fisher_a.sum() + fisher_b.sum())
    assert math.isclose(scores.original, original, rel_tol=1e-10)
    assert math.isclose(scores.expanded, expanded, rel_tol=1e-10)
    assert math.isclose(scores.ratio, expanded / original, rel_tol=1e-10) and scores.ratio >= 1


def test_fisher_accumulates_over_backward_calls_and_trial_never_reaches_grad():
    module, gen = make_module(8, 5, capacity=4, rank=2, seed=11)
    batches = [(torch.randn(4, 3, 8, generator=gen, dtype=torch.float64),
                torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)) for _ in range(2)]
    # gradients without measuring
    for x, t in batches:
        batch_loss(module(x), t, "mean").backward()
    plain_a, plain_b = module.lora_A.grad.clone(), module.lora_B.grad.clone()
    module.zero_grad()
    module.start_measuring()
    for x, t in batches:
        batch_loss(module(x), t, "mean").backward()
    torch.testing.assert_close(module.lora_A.grad, plain_a, rtol=1e-12, atol=0)
    torch.testing.assert_close(module.lora_B.grad, plain_b, rtol=1e-12, atol=0)
    assert torch.count_nonzero(module.lora_B.grad[:, 2:]) == 0
    stats = module.fisher_statistics()
    assert stats[FISHER_ROW_COUNT, 0] == 8
    # the accumulated statistics equal the oracle summed over both batches
    total_b = sum(oracle_fisher(module, x, t, "mean")[1] * x.shape[0] for x, t in batches)
    torch.testing.assert_close(stats[FISHER_ROW_B, [0, 1, 4]], total_b, rtol=1e-10, atol=0)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_input_while_measuring_names_module(bad_value):
    from selora_kernels.expansion.fisher import batched_fisher_scores

    module, _ = make_module(4, 3, capacity=2, rank=1, seed=1)
    module.selora_name = "unet.down_blocks.0.attn1.to_q"
    other, _ = make_module(4, 3, capacity=2, rank=1, seed=2)
    other.selora_name = "unet.up_blocks.1.attn2.to_k"
    for m in (module, other):
        m.start_measuring()
    x = torch.ones(3, 2, 4, dtype=torch.float64)
    x[1, 0, 2] = bad_value
    x[2, 1, 0] = bad_value
    module(x).sum().backward()  # no check in the forward: no pass over x, no host sync
    other(torch.ones(3, 2, 4, dtype=torch.float64)).sum().backward()
    stats = module.fisher_statistics()
    assert stats[FISHER_ROW_COUNT, 0] == 3 and stats[FISHER_ROW_COUNT, FISHER_COL_NONFINITE] == 2
    assert other.fisher_statistics()[FISHER_ROW_COUNT, FISHER_COL_NONFINITE] == 0
    with pytest.raises(ValueError, match=r"down_blocks\.0\.attn1\.to_q \(2 input rows\)"):
        module.fisher_scores()
    with pytest.raises(ValueError, match="down_blocks.0.attn1.to_q") as error:
        batched_fisher_scores([other, module])
    assert "up_blocks" not in str(error.value)
    other.fisher_scores()  # a clean module reads fine
    module.stop_measuring()
    module(x)  # not measuring: nothing counted, no error


def test_no_measuring_means_no_statistics():
    module, _ = make_module(4, 3, capacity=2, rank=1, seed=2)
    with pytest.raises(RuntimeError, match="start_measuring"):
        module.fisher_statistics()
    module.start_measuring()
    scores = module.fisher_scores()  # nothing accumulated yet: never a reason to expand, even at lambda 1
    assert scores.samples == 0 and math.isnan(scores.ratio) and not scores.ratio >= 1.0
