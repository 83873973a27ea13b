"""SeLoRALinear forward and gradients against float64 references; bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from selora_kernels import SeLoRALinear
from selora_kernels.ops.reference import forward_reference

from helpers import assert_close, fill_live_slots


def float64_output(module, x: torch.Tensor) -> torch.Tensor:
    """The module's output by the one float64 reference (ops/reference.py), over the live slots."""
    r = module.rank
    bias = module.bias.double() if module.bias is not None else None
    y = forward_reference(x.double().reshape(-1, module.in_features), module.weight.double(), bias,
                          module.lora_A[:r].double(), module.lora_B[:, :r].double(), module.scale)
    return y.reshape(*x.shape[:-1], module.out_features)

SHAPES = [((5, 12), 12, 7), ((3, 4, 12), 12, 9), ((2, 3, 2, 16), 16, 5), ((12,), 12, 3)]


@pytest.mark.parametrize("shape,in_f,out_f", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", ["one", "mid", "capacity"])
def test_forward_and_gradients_match_float64(shape, in_f, out_f, dtype, rank):
    gen = torch.Generator().manual_seed(hash((shape, str(dtype), rank)) % 2**31)
    module = SeLoRALinear(in_f, out_f, capacity=7, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(out_f, in_f, generator=gen))
        module.bias.copy_(torch.randn(out_f, generator=gen))
    r = {"one": 1, "mid": 4, "capacity": 7}[rank]
    fill_live_slots(module, r, gen)
    x = torch.randn(shape, generator=gen).to(dtype).requires_grad_(True)
    y = module(x)
    assert y.shape == (*shape[:-1], out_f) and y.dtype == dtype

    x64 = x.detach().double().requires_grad_(True)
    a64 = module.lora_A.detach().double().requires_grad_(True)
    b64 = module.lora_B.detach().double().requires_grad_(True)
    y64 = (x64 @ module.weight.double().t() + module.bias.double()
           + module.scale * (x64 @ a64[:r].t()) @ b64[:, :r].t())
    assert_close(y, y64, dtype, scale=10)
    assert_close(y, float64_output(module, x.detach()), dtype, scale=10)

    grad_y = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(grad_y)
    y64.backward(grad_y.double())
    assert_close(x.grad, x64.grad, dtype, scale=10)
    assert_close(module.lora_A.grad, a64.grad, dtype, scale=30)
    assert_close(module.lora_B.grad, b64.grad, dtype, scale=30)
    # dead slots: exactly zero gradient, so no optimizer ever moves them
    assert torch.count_nonzero(module.lora_A.grad[r:]) == 0
    assert torch.count_nonzero(module.lora_B.grad[:, r:]) == 0
    assert module.weight.grad is None and module.bias.grad is None


def test_dead_slots_get_zero_gradient_even_when_corrupted():
    gen = torch.Generator().manual_seed(0)
    module = SeLoRALinear(8, 6, capacity=5)
    fill_live_slots(module, 2, gen)
    with torch.no_grad():
        module.lora_A[3] = 1.0  # a dead row that is (wrongly) non-zero
    module(torch.randn(4, 8, generator=gen)).sum().backward()
    assert torch.count_nonzero(module.lora_A.grad[2:]) == 0
    assert torch.count_nonzero(module.lora_B.grad[:, 2:]) == 0
    assert torch.count_nonzero(module.lora_B.grad[:, :2]) > 0


def test_from_linear_is_drop_in_and_starts_as_identity_of_base():
    base = nn.Linear(10, 4)
    module = SeLoRALinear.from_linear(base, alpha=16)
    assert module.weight is base.weight and not base.weight.requires_grad
    assert module.rank == 1 and module.capacity == 15 and module.scale == 16.0
    x = torch.randn(3, 7, 10)
    torch.testing.assert_close(module(x), base(x))  # B = 0 at init
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A", "lora_B"]
    bound = (6 / 10) ** 0.5
    assert module.lora_A[0].abs().max() <= bound and module.lora_A[0].abs().max() > 0
    assert torch.count_nonzero(module.lora_A[1:]) == 0 and torch.count_nonzero(module.lora_B) == 0


def test_non_contiguous_input():
    gen = torch.Generator().manual_seed(3)
    module = SeLoRALinear(6, 5, capacity=3)
    fill_live_slots(module, 2, gen)
    x = torch.randn(6, 4, 3, generator=gen).permute(1, 2, 0)  # (4, 3, 6), non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(module(x).double(), float64_output(module, x), rtol=1e-5, atol=1e-5)


def test_autocast_bfloat16_on_cpu():
    gen = torch.Generator().manual_seed(4)
    module = SeLoRALinear(16, 8, capacity=3)
    fill_live_slots(module, 3, gen)
    x = torch.randn(4, 16, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    assert y.dtype == torch.bfloat16
    assert_close(y, float64_output(module, x), torch.bfloat16, scale=10)
    y.float().sum().backward()
    assert module.lora_A.grad.dtype == torch.float32


def test_bad_input_messages():
    with pytest.raises(TypeError, match="nn.Linear"):
        SeLoRALinear.from_linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="r_init"):
        SeLoRALinear(4, 4, r_init=0)
    with pytest.raises(ValueError, match="capacity"):
        SeLoRALinear(4, 4, r_init=4, capacity=2)
    with pytest.raises(ValueError, match="scaling"):
        SeLoRALinear(4, 4, scaling="sqrt")
    module = SeLoRALinear(4, 3)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        module(torch.randn(2, 5))
    with pytest.raises(TypeError, match="dtype"):
        module(torch.randn(2, 4, dtype=torch.float64))


def test_merged_linear_matches_adapter():
    gen = torch.Generator().manual_seed(5)
    module = SeLoRALinear(9, 7, capacity=4)
    fill_live_slots(module, 3, gen)
    x = torch.randn(5, 9, generator=gen)
    torch.testing.assert_close(module.to_linear()(x), module(x), rtol=1e-5, atol=1e-5)


def test_module_applied_twice_while_measuring_raises_naming_it():
    """Two uses of one module per sample would give per-use Fisher (and count samples twice): an error, not
    a silently different number. Not measuring, the same model trains normally."""
    torch.manual_seed(0)
    layer = SeLoRALinear(8, 8, r_init=1)
    layer.selora_name = "block.shared"
    x = torch.randn(4, 8)
    layer(layer(x)).sum().backward()  # not measuring: fine
    layer.start_measuring()
    with pytest.raises(RuntimeError, match=r"block\.shared was applied more than once"):
        layer(layer(x)).sum().backward()


def test_gradient_checkpointing_is_one_use_and_keeps_the_fisher():
    torch.manual_seed(0)
    layer = SeLoRALinear(8, 8, r_init=2)
    with torch.no_grad():
        layer.lora_B[:, :2].normal_()
    x = torch.randn(4, 3, 8)
    results = []
    for checkpointed in (False, True):
        layer.start_measuring()
        for micro_batch in (x[:2], x[2:]):  # two backward passes of one window: two graph tasks
            y = (torch.utils.checkpoint.checkpoint(layer, micro_batch, use_reentrant=False) if checkpointed
                 else layer(micro_batch))
            y.square().sum().backward()
        results.append(layer.fisher_statistics())
        layer.stop_measuring()
        layer.zero_grad()
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=0)
    assert float(results[0].abs().sum()) > 0
