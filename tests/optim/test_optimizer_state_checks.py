"""SeLoRAAdamW.load_state_dict refuses a state that does not fit the buffers (capacity, rank, layout)."""
from __future__ import annotations

import pytest
import torch

from selora_kernels import SeLoRAAdamW, SeLoRALinear, expand_modules

from helpers import fill_live_slots


def _module(capacity, rank, name="text_encoder.layers.1.v_proj"):
    gen = torch.Generator().manual_seed(0)
    module = SeLoRALinear(6, 4, capacity=capacity)
    module.selora_name = name
    fill_live_slots(module, rank, gen)
    return module


def _train(module, steps=2):
    optimizer = SeLoRAAdamW(module.parameters(), lr=1e-2)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        optimizer.zero_grad()
        module(x).square().mean().backward()
        optimizer.step()
    return optimizer


def _assert_nothing_loaded(optimizer):
    assert not any(optimizer.state.values())


def test_state_of_another_capacity_is_refused_naming_parameter_module_and_shapes():
    saved = _train(_module(capacity=2, rank=2)).state_dict()  # lora_A state (2, 6)
    module = _module(capacity=5, rank=2)
    optimizer = SeLoRAAdamW(module.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter 0 \(lora_A of text_encoder\.layers\.1\.v_proj\) "
                                         r"has shape \(2, 6\), the parameter needs \(5, 6\)"):
        optimizer.load_state_dict(saved)
    _assert_nothing_loaded(optimizer)


def test_slot_steps_of_another_capacity_are_refused():
    module = _module(capacity=5, rank=2)
    saved = _train(module).state_dict()
    saved["state"][1]["slot_steps"] = torch.tensor([2.0, 2.0])  # lora_B: 5 slots
    optimizer = SeLoRAAdamW(module.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"'slot_steps' of parameter 1 \(lora_B of text_encoder\.layers\.1\.v_proj\)"
                                         r" has shape \(2,\), the parameter needs \(5,\)"):
        optimizer.load_state_dict(saved)
    _assert_nothing_loaded(optimizer)


@pytest.mark.parametrize("key", ["slot_steps", "exp_avg", "exp_avg_sq"])
def test_state_of_a_higher_rank_is_refused(key):
    trained = _module(capacity=5, rank=2)
    trained_opt = _train(trained)
    expand_modules([trained], optimizer=trained_opt, seed=0)  # rank 3: slot 2 gets state
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    trained(x).square().mean().backward()
    trained_opt.step()
    saved = trained_opt.state_dict()
    state = saved["state"][1]  # lora_B (slots are columns): its slot 2 gets a gradient at once

    def dead(name):
        return state[name][2:] if name == "slot_steps" else state[name][:, 2:]

    for other in {"slot_steps", "exp_avg", "exp_avg_sq"} - {key}:
        dead(other).zero_()  # only `key` of lora_B says that slot 2 was live
    for value in saved["state"][0].values():
        value[2:].zero_()
    assert dead(key).any()

    module = _module(capacity=5, rank=2, name="unet.up_blocks.1.attn2.to_q")
    optimizer = SeLoRAAdamW(module.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=rf"unet\.up_blocks\.1\.attn2\.to_q has live rank 2, but the saved state "
                                         rf"'{key}' of parameter 1 \(lora_B of .*\) is non-zero in dead slots 2\.\.4"):
        optimizer.load_state_dict(saved)
    _assert_nothing_loaded(optimizer)


def test_matching_state_loads_and_steps():
    trained = _module(capacity=5, rank=3)
    saved = _train(trained, steps=3).state_dict()
    module = _module(capacity=5, rank=3)
    optimizer = SeLoRAAdamW(module.parameters(), lr=1e-2)
    optimizer.load_state_dict(saved)
    assert optimizer.state[module.lora_A]["slot_steps"].tolist() == [3, 3, 3, 0, 0]
    module(torch.randn(2, 6)).sum().backward()
    optimizer.step()
    assert optimizer.state[module.lora_B]["slot_steps"].tolist() == [4, 4, 4, 0, 0]


def test_plain_parameter_state_of_another_shape_is_refused():
    module = _module(capacity=3, rank=1)
    head = torch.nn.Linear(4, 2)
    optimizer = SeLoRAAdamW([module.lora_A, module.lora_B, head.weight], lr=1e-2)
    (head(module(torch.randn(2, 6))).sum()).backward()
    optimizer.step()
    saved = optimizer.state_dict()
    other_head = torch.nn.Linear(4, 3)
    fresh = SeLoRAAdamW([module.lora_A, module.lora_B, other_head.weight], lr=1e-2)
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter 2 has shape \(2, 4\), the parameter needs \(3, 4\)"):
        fresh.load_state_dict(saved)
    _assert_nothing_loaded(fresh)


def test_torch_adamw_state_for_an_adapter_is_refused():
    module = _module(capacity=3, rank=2)
    adamw = torch.optim.AdamW(module.parameters(), lr=1e-2)
    module(torch.randn(2, 6)).sum().backward()
    adamw.step()
    optimizer = SeLoRAAdamW(module.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"parameter 0 \(lora_A of text_encoder\.layers\.1\.v_proj\) has no "
                                         r"slot_steps"):
        optimizer.load_state_dict(adamw.state_dict())
    _assert_nothing_loaded(optimizer)
