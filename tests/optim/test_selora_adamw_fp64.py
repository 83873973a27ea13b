"""float64 adapters are updated in float64 arithmetic by every adam_step_ backend (and so by SeLoRAAdamW)."""
from __future__ import annotations

import pytest
import torch

from selora_kernels import SeLoRAAdamW, SeLoRALinear
from selora_kernels.ops.capacity import adam_step_

from helpers import require_backend

# float32 arithmetic is off by ~1e-8..1e-7 relative; float64 arithmetic by a few ulps (the reference's
# vectorised lerp may fuse a multiply-add where the kernels do not).
FP64_TOL = dict(rtol=1e-14, atol=1e-15)


def _devices_and_backends():
    cases = [("cpu", "extension"), ("cpu", "fallback")]
    if torch.cuda.is_available():
        cases.append(("cuda", "extension"))
    return cases


@pytest.fixture(params=_devices_and_backends(), ids=lambda case: "-".join(case))
def device_backend(request):
    device, backend = request.param
    require_backend(backend)
    return request.param


def _slot(tensor, slot_dim, k):
    return tensor[k] if slot_dim == 0 else tensor[:, k]


@pytest.mark.parametrize("slot_dim", [0, 1])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lr_zero_leaves_fp64_buffers_bit_unchanged(device_backend, slot_dim, weight_decay):
    device, backend = device_backend
    gen = torch.Generator().manual_seed(0)
    capacity = 4
    shape = (capacity, 9) if slot_dim == 0 else (9, capacity)
    param = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    exp_avg = (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.1).to(device)
    exp_avg_sq = (torch.rand(shape, generator=gen, dtype=torch.float64) * 0.01).to(device)
    before = param.clone()
    for _ in range(3):
        grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
        adam_step_([param], [grad], [exp_avg], [exp_avg_sq], [torch.zeros(capacity, device=device)],
                   [torch.tensor(3, device=device)], [slot_dim], 0.0, 0.9, 0.999, 1e-8, weight_decay,
                   backend=backend)
    assert torch.equal(param, before), f"max change {(param - before).abs().max().item():.3g}"


@pytest.mark.parametrize("slot_dim", [0, 1])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_fp64_slots_match_float64_adamw_per_slot(device_backend, slot_dim, weight_decay):
    """Each slot moves as torch.optim.AdamW on a fresh float64 tensor from the step it went live."""
    device, backend = device_backend
    lr, betas, eps = 3e-3, (0.9, 0.999), 1e-8
    capacity, per_slot, n_steps = 6, 7, 10
    live_schedule = {0: 2, 3: 3, 6: 5}  # step index -> live rank (slot 5 never lives)
    gen = torch.Generator().manual_seed(11)
    shape = (capacity, per_slot) if slot_dim == 0 else (per_slot, capacity)
    param = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    initial = param.clone()
    exp_avg = torch.zeros(shape, dtype=torch.float64, device=device)
    exp_avg_sq = torch.zeros_like(exp_avg)
    slot_steps = torch.zeros(capacity, device=device)
    live_rank = torch.tensor(0, device=device)

    references = {}  # slot -> (standalone float64 CPU Parameter, its AdamW)
    for step in range(n_steps):
        if step in live_schedule:
            live_rank.fill_(live_schedule[step])
        for k in range(int(live_rank)):
            if k not in references:
                standalone = torch.nn.Parameter(_slot(param, slot_dim, k).detach().cpu().clone())
                references[k] = (standalone, torch.optim.AdamW([standalone], lr=lr, betas=betas, eps=eps,
                                                               weight_decay=weight_decay, foreach=False))
        grad = torch.randn(shape, generator=gen, dtype=torch.float64)
        adam_step_([param], [grad.to(device)], [exp_avg], [exp_avg_sq], [slot_steps], [live_rank], [slot_dim],
                   lr, betas[0], betas[1], eps, weight_decay, backend=backend)
        for k, (standalone, optimizer) in references.items():
            standalone.grad = _slot(grad, slot_dim, k).clone()
            optimizer.step()

    param, exp_avg, exp_avg_sq = param.cpu(), exp_avg.cpu(), exp_avg_sq.cpu()
    for k, (standalone, optimizer) in references.items():
        state = optimizer.state[standalone]
        for name, ours, ref in (("param", _slot(param, slot_dim, k), standalone.detach()),
                                ("exp_avg", _slot(exp_avg, slot_dim, k), state["exp_avg"]),
                                ("exp_avg_sq", _slot(exp_avg_sq, slot_dim, k), state["exp_avg_sq"])):
            assert ours.dtype == torch.float64
            torch.testing.assert_close(ours, ref, **FP64_TOL, msg=lambda m, n=name, k=k: f"slot {k} {n}: {m}")
        assert slot_steps[k].item() == state["step"].item()
    for k in range(len(references), capacity):
        assert torch.equal(_slot(param, slot_dim, k), _slot(initial, slot_dim, k)), f"dead slot {k} moved"
    assert slot_steps.tolist() == [10, 10, 7, 4, 4, 0]


def test_selora_adamw_lr_zero_keeps_fp64_adapter_bit_unchanged():
    gen = torch.Generator().manual_seed(3)
    module = SeLoRALinear(10, 6, r_init=2, capacity=3, dtype=torch.float64)
    with torch.no_grad():
        module.lora_B[:, :2] = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    optimizer = SeLoRAAdamW([module.lora_A, module.lora_B], lr=0.0, weight_decay=0.01)
    before = (module.lora_A.detach().clone(), module.lora_B.detach().clone())
    for _ in range(2):
        optimizer.zero_grad()
        module(torch.randn(4, 10, generator=gen, dtype=torch.float64)).square().sum().backward()
        optimizer.step()
    assert optimizer.state[module.lora_A]["slot_steps"].tolist() == [2, 2, 0]
    assert torch.equal(module.lora_A, before[0]) and torch.equal(module.lora_B, before[1])
