"""Growth past capacity without optimizer=: the state of optimizers that hold the buffers grows too."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from selora_kernels import SeLoRAAdamW, SeLoRALinear, expand_modules
from selora_kernels.config import next_capacity

from helpers import fill_live_slots, require_backend

pytestmark = pytest.mark.filterwarnings("ignore:expanding SeLoRA modules under torch's Adam")

OPTIMIZERS = {
    "torch-AdamW": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01),
    "SeLoRAAdamW": lambda params: SeLoRAAdamW(params, lr=1e-2, weight_decay=0.01),
}


def _trained(make_optimizer, name):
    torch.manual_seed(2)  # the base weight and the trial row come from the global generator
    gen = torch.Generator().manual_seed(2)
    module = SeLoRALinear(6, 5, capacity=2)
    module.selora_name = name
    fill_live_slots(module, 2, gen)  # full: the next expansion grows the buffers
    optimizer = make_optimizer(module.parameters())
    x = torch.randn(4, 6, generator=gen)
    for _ in range(2):
        optimizer.zero_grad()
        module(x).square().mean().backward()
        optimizer.step()
    return module, optimizer, x


@pytest.mark.parametrize("backend", ["extension", "fallback"])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_growth_without_optimizer_grows_the_state_like_passing_it(kind, backend):
    require_backend(backend)
    passed, passed_opt, x = _trained(OPTIMIZERS[kind], "passed")
    forgot, forgot_opt, _ = _trained(OPTIMIZERS[kind], "forgot")
    old_m = forgot_opt.state[forgot.lora_A]["exp_avg"].clone()

    expand_modules([passed], optimizer=passed_opt, seed=4, backend=backend)
    expand_modules([forgot], seed=4, backend=backend)

    assert forgot.capacity == passed.capacity == next_capacity(2)
    for param in (forgot.lora_A, forgot.lora_B):
        state = forgot_opt.state[param]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == param.shape
        if kind == "SeLoRAAdamW":
            assert state["slot_steps"].tolist() == [2, 2, 0, 0, 0]
    state = forgot_opt.state[forgot.lora_A]
    assert torch.equal(state["exp_avg"][:2], old_m) and not state["exp_avg"][2:].any()
    for module, optimizer in ((passed, passed_opt), (forgot, forgot_opt)):
        optimizer.zero_grad()
        module(x).square().mean().backward()
        optimizer.step()  # failed on the old-size state before
    assert torch.equal(forgot.lora_A, passed.lora_A) and torch.equal(forgot.lora_B, passed.lora_B)


def test_loaded_selora_adamw_that_never_stepped_is_grown_too():
    module, trained_opt, x = _trained(OPTIMIZERS["SeLoRAAdamW"], "loaded")
    optimizer = SeLoRAAdamW(module.parameters(), lr=1e-2)
    optimizer.load_state_dict(trained_opt.state_dict())
    del trained_opt
    expand_modules([module], seed=0)
    assert optimizer.state[module.lora_A]["slot_steps"].tolist() == [2, 2, 0, 0, 0]
    assert optimizer.state[module.lora_B]["exp_avg_sq"].shape == module.lora_B.shape
    module(x).square().mean().backward()
    optimizer.step()
    assert optimizer.state[module.lora_A]["slot_steps"].tolist() == [3, 3, 1, 0, 0]


def test_unsupported_optimizer_state_is_refused_before_anything_grows():
    module, optimizer, x = _trained(lambda params: torch.optim.RMSprop(params, lr=1e-3),
                                    "unet.mid_block.attn1.to_k")
    shapes = (module.lora_A.shape, module.lora_B.shape)
    with pytest.raises(ValueError, match=r"unet\.mid_block\.attn1\.to_k.*RMSprop.*optimizer="):
        expand_modules([module], seed=0)
    assert (module.lora_A.shape, module.lora_B.shape) == shapes and module.rank == 2
    assert optimizer.state[module.lora_A]["square_avg"].shape == module.lora_A.shape
    optimizer.step()  # still consistent


def test_expansion_within_capacity_needs_no_optimizer_state_growth():
    gen = torch.Generator().manual_seed(0)
    module = SeLoRALinear(6, 5, capacity=4)
    fill_live_slots(module, 2, gen)
    optimizer = torch.optim.RMSprop(module.parameters(), lr=1e-3)
    module(torch.randn(3, 6, generator=gen)).sum().backward()
    optimizer.step()
    expand_modules([module], seed=0)  # no growth: an unknown state layout does not matter
    assert module.rank == 3 and module.capacity == 4


def test_the_registry_keeps_no_optimizer_alive():
    module, optimizer, _ = _trained(OPTIMIZERS["SeLoRAAdamW"], "weak")
    ref = weakref.ref(optimizer)
    del optimizer
    gc.collect()
    assert ref() is None
    expand_modules([module], seed=0)  # nothing left to grow
    assert module.capacity == next_capacity(2)
