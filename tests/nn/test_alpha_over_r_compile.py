"""torch.compile across alpha_over_r growths: s = alpha / r changes at every growth, and must not recompile."""
from __future__ import annotations

import copy

import torch

from selora_kernels import SeLoRALinear, expand_modules


def test_alpha_over_r_growth_does_not_recompile_and_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    module = SeLoRALinear(8, 6, capacity=15, scaling="alpha_over_r")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    x = torch.randn(3, 5, 8)
    scales, frames = [], []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(11):
            module.zero_grad()
            compiled(x).square().mean().backward()
            grad_a = module.lora_A.grad.clone()
            eager = copy.deepcopy(module)
            eager.zero_grad()
            eager(x).square().mean().backward()
            # same s as eager: identical output and gradients (a stale s would change both)
            torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=0)
            torch.testing.assert_close(grad_a, eager.lora_A.grad, rtol=0, atol=0)
            frames.append(counter.frame_count)
            scales.append(module.scale)
            with torch.no_grad():
                module.lora_B[:, : module.rank] += 0.1  # stand-in for an optimizer step
            if step < 10:
                expand_modules([module], seed=step)
    assert module.rank == 11
    assert len(set(scales)) == 11  # s changed at every one of the 10 growths
    assert frames == [frames[0]] * len(frames), f"recompiled: frame counts {frames}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
