"""Expansion within and past capacity, optimizer state growth, per-slot Adam, state dicts."""
from __future__ import annotations

import pytest
import torch

from selora_kernels import SeLoRAAdamW, SeLoRALinear, expand_modules
from selora_kernels.config import next_capacity
from selora_kernels.optim import state_growth

from helpers import fill_live_slots, require_backend

BACKENDS = ["extension", "fallback"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_expand_is_bit_identical_and_reallocates_nothing(dtype, backend):
    require_backend(backend)
    gen = torch.Generator().manual_seed(0)
    module = SeLoRALinear(12, 8, capacity=4, dtype=dtype)
    fill_live_slots(module, 1, gen)
    x = torch.randn(3, 5, 12, generator=gen).to(dtype)
    pointers = (module.lora_A.data_ptr(), module.lora_B.data_ptr())
    trial = module.trial_row.clone()
    before = module(x)
    expand_modules([module], seed=7, backend=backend)
    after = module(x)
    assert torch.equal(before, after)
    assert module.rank == 2 and int(module.live_rank) == 2 and module.capacity == 4
    assert (module.lora_A.data_ptr(), module.lora_B.data_ptr()) == pointers
    assert torch.equal(module.lora_A[1], trial)  # the trial row was adopted as row K
    assert torch.count_nonzero(module.lora_B[:, 1:]) == 0
    assert not torch.equal(module.trial_row, trial)  # a fresh trial row was drawn
    bound = (6 / 12) ** 0.5
    assert module.trial_row.abs().max() <= bound


@pytest.mark.parametrize("backend", BACKENDS)
def test_growth_past_capacity_in_place_with_optimizer_state(backend):
    require_backend(backend)
    gen = torch.Generator().manual_seed(1)
    module = SeLoRALinear(6, 5, capacity=2)
    fill_live_slots(module, 2, gen)
    opt = SeLoRAAdamW(module.parameters(), lr=1e-2)
    x = torch.randn(4, 6, generator=gen)
    module(x).square().mean().backward()
    opt.step()
    params = (module.lora_A, module.lora_B)
    old_a, old_b = module.lora_A.detach().clone(), module.lora_B.detach().clone()
    old_m = opt.state[module.lora_A]["exp_avg"].clone()
    before = module(x)
    expand_modules([module], optimizer=opt, seed=3, backend=backend)
    assert (module.lora_A, module.lora_B) == params  # same Parameter objects
    assert module.capacity == next_capacity(2) and module.rank == 3
    # every old slot block keeps its bounds and the new block adds exact zeros: bit-identical
    assert torch.equal(module(x), before)
    assert torch.equal(module.lora_A[:2], old_a) and torch.equal(module.lora_B[:, :2], old_b)
    assert torch.count_nonzero(module.lora_A[3:]) == 0
    state = opt.state[module.lora_A]
    assert state["exp_avg"].shape == module.lora_A.shape and state["slot_steps"].shape == (module.capacity,)
    assert torch.equal(state["exp_avg"][:2], old_m) and torch.count_nonzero(state["exp_avg"][2:]) == 0
    assert module.lora_A.grad.shape == module.lora_A.shape
    module.zero_grad()
    module(x).square().mean().backward()
    opt.step()  # works after the growth
    assert state["slot_steps"].tolist()[:4] == [2, 2, 1, 0]


def test_grown_slot_moves_exactly_as_fresh_adam():
    """A slot that goes live at step k follows a fresh AdamW fed with the same gradients."""
    gen = torch.Generator().manual_seed(2)
    module = SeLoRALinear(7, 4, capacity=3)
    fill_live_slots(module, 1, gen)
    opt = SeLoRAAdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    x_batches = [torch.randn(5, 7, generator=gen) for _ in range(8)]
    for x in x_batches[:4]:
        opt.zero_grad()
        module(x).square().mean().backward()
        opt.step()
    expand_modules([module], optimizer=opt, seed=0)
    # slot 1 of B went live at step 5: a fresh AdamW on a copy of it must match step for step
    fresh_b = torch.nn.Parameter(module.lora_B[:, 1].detach().clone())
    fresh_a = torch.nn.Parameter(module.lora_A[1].detach().clone())
    fresh = torch.optim.AdamW([fresh_a, fresh_b], lr=1e-2, weight_decay=0.1, foreach=False)
    trial = module.trial_row.clone()
    for x in x_batches[4:]:
        opt.zero_grad()
        module(x).square().mean().backward()
        fresh_a.grad = module.lora_A.grad[1].clone()
        fresh_b.grad = module.lora_B.grad[:, 1].clone()
        opt.step()
        fresh.step()
        torch.testing.assert_close(module.lora_B[:, 1], fresh_b.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(module.lora_A[1], fresh_a.detach(), rtol=1e-6, atol=1e-7)
    assert torch.count_nonzero(module.lora_B[:, 2:]) == 0 and torch.count_nonzero(module.lora_A[2:]) == 0
    assert torch.equal(module.trial_row, trial)  # the trial row is outside the optimizer and weight decay


def test_torch_adam_shared_step_trap_is_what_selora_adamw_fixes(monkeypatch):
    """Under torch's AdamW the grown slot's first update is ~3x too large: our optimizer avoids it."""
    gen = torch.Generator().manual_seed(3)
    updates = {}
    for name in ("torch", "selora"):
        torch.manual_seed(0)
        module = SeLoRALinear(6, 4, capacity=3)
        fill_live_slots(module, 1, torch.Generator().manual_seed(5))
        opt = (torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.0) if name == "torch"
               else SeLoRAAdamW(module.parameters(), lr=1e-3))
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(9))
        for _ in range(50):
            opt.zero_grad()
            module(x).square().mean().backward()
            opt.step()
        if name == "torch":
            monkeypatch.setattr(state_growth, "_warned_shared_step", False)
            with pytest.warns(UserWarning, match="step counter"):
                expand_modules([module], optimizer=opt, seed=1)
        else:
            expand_modules([module], optimizer=opt, seed=1)
        before = module.lora_B[:, 1].detach().clone()
        opt.zero_grad()
        module(x).square().mean().backward()
        opt.step()
        updates[name] = (module.lora_B[:, 1] - before).abs().max().item()
    assert updates["selora"] == pytest.approx(1e-3, rel=1e-3)  # fresh Adam: first step moves by lr
    # torch: bias corrections of step 51 applied to a one-step-old moment pair
    bc1, bc2 = 1 - 0.9 ** 51, 1 - 0.999 ** 51
    expected_torch = 1e-3 * 0.1 * bc2 ** 0.5 / (bc1 * 0.001 ** 0.5)
    assert updates["torch"] == pytest.approx(expected_torch, rel=1e-3)
    assert abs(updates["torch"] / updates["selora"] - 1) > 0.25


def test_unknown_optimizer_is_refused_with_supported_list():
    module = SeLoRALinear(4, 3, capacity=1)
    opt = torch.optim.Adagrad(module.parameters())
    with pytest.raises(TypeError, match="SeLoRAAdamW"):
        expand_modules([module], optimizer=opt)


def test_batched_expansion_extension_equals_fallback_and_is_seeded():
    def build():
        torch.manual_seed(0)
        return [SeLoRALinear(5 + i, 3 + i, capacity=2) for i in range(6)]

    require_backend("extension")
    results = {}
    for backend in BACKENDS:
        modules = build()
        expand_modules(modules, seed=123, backend=backend)
        expand_modules(modules[:3], seed=456, backend=backend)  # these three grow past capacity
        results[backend] = [torch.cat([m.lora_A.flatten(), m.trial_row, m.live_rank[None].float()])
                            for m in modules]
        assert [m.rank for m in modules] == [3, 3, 3, 2, 2, 2]
        assert [m.capacity for m in modules] == [5, 5, 5, 2, 2, 2]
    for a, b in zip(*results.values()):
        assert torch.equal(a, b)


def test_alpha_over_r_rescales_b_so_output_does_not_jump():
    gen = torch.Generator().manual_seed(4)
    module = SeLoRALinear(6, 4, capacity=3, scaling="alpha_over_r", alpha=8)
    fill_live_slots(module, 1, gen)
    x = torch.randn(3, 6, generator=gen)
    before = module(x)
    expand_modules([module], seed=0)
    assert module.scale == 4.0
    torch.testing.assert_close(module(x), before, rtol=1e-6, atol=1e-6)


def test_state_dict_round_trip_adopts_rank_and_capacity():
    gen = torch.Generator().manual_seed(5)
    trained = SeLoRALinear(6, 4, capacity=2)
    fill_live_slots(trained, 2, gen)
    expand_modules([trained], seed=0)  # rank 3, capacity grown to 5
    fresh = SeLoRALinear(6, 4)
    fresh.weight.data.copy_(trained.weight)
    fresh.bias.data.copy_(trained.bias)
    assert trained.reallocated and not fresh.reallocated
    fresh.load_state_dict(trained.state_dict())
    assert fresh.rank == 3 and fresh.capacity == trained.capacity
    assert fresh.reallocated  # a DDP built before the load no longer averages its gradients
    x = torch.randn(2, 6, generator=gen)
    assert torch.equal(fresh(x), trained(x))


def test_state_dict_whose_rank_disagrees_is_refused():
    module = SeLoRALinear(6, 4, capacity=4)
    module.selora_name = "text_encoder.layers.0.q_proj"
    state = module.state_dict()
    state["lora_B"] = torch.ones_like(state["lora_B"])  # live columns beyond the saved rank 1
    with pytest.raises(ValueError, match="q_proj.*disagree"):
        module.load_state_dict(state)
    state = module.state_dict()
    state["live_rank"] = torch.tensor(9)
    with pytest.raises(ValueError, match="rank 9"):
        module.load_state_dict(state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_growth_past_default_capacity_is_bit_identical(dtype):
    """Along the default capacity chain (15 -> 31) the slot blocks keep their bounds: exact output."""
    gen = torch.Generator().manual_seed(8)
    module = SeLoRALinear(24, 10, dtype=dtype)
    assert module.capacity == 15
    fill_live_slots(module, 15, gen)
    x = torch.randn(4, 3, 24, generator=gen).to(dtype)
    before = module(x)
    expand_modules([module], seed=1)
    assert module.capacity == 31 and module.rank == 16
    assert torch.equal(module(x), before)


def test_deepcopy_and_pickle_keep_the_adapter_registration(tmp_path):
    import copy

    from selora_kernels.nn.slots import slot_dim_of

    model = torch.nn.Sequential(SeLoRALinear(6, 4, capacity=2))
    clone = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")  # whole-model pickling works (no weak references on params)
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for m in (clone, loaded):
        assert slot_dim_of(m[0].lora_A) == 0 and slot_dim_of(m[0].lora_B) == 1
        opt = SeLoRAAdamW(m.parameters(), lr=1e-2)
        m(torch.randn(3, 6)).sum().backward()
        opt.step()
        assert "slot_steps" in opt.state[m[0].lora_A]  # per-slot Adam, not the plain fallback
        expand_modules([m[0]], optimizer=opt, seed=0)
        expand_modules([m[0]], optimizer=opt, seed=1)  # past capacity: state grows with the buffers
        assert opt.state[m[0].lora_A]["exp_avg"].shape == m[0].lora_A.shape


def test_optimizer_state_dict_round_trip_keeps_fp32_slot_steps_for_bf16_adapters():
    module = SeLoRALinear(6, 4, capacity=3, dtype=torch.bfloat16)
    opt = SeLoRAAdamW(module.parameters(), lr=1e-2)
    x = torch.randn(5, 6, dtype=torch.bfloat16)
    for _ in range(300):  # more steps than bf16 counts exactly
        opt.zero_grad()
        module(x).float().square().mean().backward()
        opt.step()
    fresh = SeLoRAAdamW(module.parameters(), lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    steps = fresh.state[module.lora_A]["slot_steps"]
    assert steps.dtype == torch.float32 and steps[0] == 300
    module(x).float().square().mean().backward()
    fresh.step()
    assert fresh.state[module.lora_A]["slot_steps"][0] == 301


def test_alpha_over_r_scale_follows_the_loaded_rank():
    gen = torch.Generator().manual_seed(6)
    trained = SeLoRALinear(8, 6, capacity=4, scaling="alpha_over_r")
    expand_modules([trained], seed=0)
    expand_modules([trained], seed=1)
    with torch.no_grad():
        trained.lora_B[:, :3] = torch.randn(6, 3, generator=gen)
    fresh = SeLoRALinear(8, 6, capacity=4, scaling="alpha_over_r")
    fresh.load_state_dict(trained.state_dict())
    assert fresh.scale == trained.scale == 8 / 3
    x = torch.randn(2, 8, generator=gen)
    assert torch.equal(fresh(x), trained(x))
