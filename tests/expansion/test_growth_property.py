"""Property: every growth, at any capacity (default or user-chosen), in fp32 / bf16 / fp64, within or past
capacity, leaves the module's output bit-identical (1,200 random growths)."""
from __future__ import annotations

import random

import pytest
import torch

from selora_kernels import SeLoRALinear, expand_modules

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
CASES = 40


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_growth_is_bit_identical(dtype):
    torch.set_num_threads(1)
    rng = random.Random(f"growth-{dtype}")
    growths = past_capacity = 0
    for case in range(CASES):
        torch.manual_seed(rng.randrange(2**31))
        in_features, out_features = rng.randrange(1, 70), rng.randrange(1, 70)
        capacity = rng.choice([None, rng.randrange(1, 12)])  # None: the default chain (15, 31, ...)
        module = SeLoRALinear(in_features, out_features, r_init=1, capacity=capacity, dtype=dtype,
                              bias=rng.random() < 0.5)
        x = torch.randn(rng.randrange(1, 9), rng.randrange(1, 5), in_features, dtype=dtype)
        for _ in range(10):
            with torch.no_grad():  # train B's live columns (and A's rows) to non-zero values
                live = module.rank
                module.lora_B[:, :live] = torch.randn(out_features, live, dtype=dtype)
                module.lora_A[:live] += 0.1 * torch.randn(live, in_features, dtype=dtype)
                before = module(x)
            was_full = module.rank >= module.capacity
            expand_modules([module], seed=rng.randrange(2**31))
            with torch.no_grad():
                after = module(x)
            assert torch.equal(before, after), (
                f"case {case}: growth to rank {module.rank} (capacity {module.capacity}, "
                f"{'past' if was_full else 'within'} capacity) changed the output by "
                f"{(after.double() - before.double()).abs().max().item():.3g}")
            growths += 1
            past_capacity += was_full
    assert growths == CASES * 10 and past_capacity > 20  # both kinds of growth are exercised
