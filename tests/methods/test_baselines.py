"""Baselines (LoRA, DyLoRA, AdaLoRA) on a tiny random Stable Diffusion: targets, counts, semantics, export."""
import copy

import pytest
import torch
from torch import nn

from selora_kernels.methods import METHODS, AdaLoRAMethod, DyLoRALinear, DyLoRAMethod, LoRAMethod, make_method

TOTAL_STEPS = 5


@pytest.fixture(scope="module")
def tiny_pipe():
    from selora_kernels.data.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


def fresh_parts(pipe):
    return copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)


def diffusion_batch(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 500, (batch, 9), generator=g), torch.randn(batch, 4, 8, 8, generator=g),
            torch.tensor([10, 700][:batch]))


def step_loss(unet, text_encoder, seed=0):
    ids, latents, timesteps = diffusion_batch(seed)
    encoded = text_encoder(ids).last_hidden_state
    return unet(latents, timesteps, encoder_hidden_states=encoded).sample.pow(2).mean()


def train(method, unet, text_encoder, steps, trainer_order=True):
    """trainer_order: the trainer's order (attach, zero_grad before after_step); else after_step first."""
    optimizer = method.make_optimizer(1e-2)
    if trainer_order:
        method.attach(optimizer)
    for step in range(steps):
        method.before_forward(step)
        loss = step_loss(unet, text_encoder, seed=step)
        extra = method.extra_loss()
        if extra is not None:
            loss = loss + extra
        loss.backward()
        optimizer.step()
        if trainer_order:
            optimizer.zero_grad(set_to_none=True)
            method.after_step(step)
        else:
            method.after_step(step)
            optimizer.zero_grad(set_to_none=True)
    return optimizer


def inject(method, unet, text_encoder):
    return method.inject({"unet": unet, "text_encoder": text_encoder})


def linear_shapes(model, names):
    return [(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names]


# ------------------------------------------------------------------------------------------------ targets / counts
def test_targets_are_selora_targets(tiny_pipe):
    from selora_kernels.config import SeLoRAConfig
    from selora_kernels.integrations.peft_method import inject_selora

    unet, text_encoder = fresh_parts(tiny_pipe)
    method = LoRAMethod()
    names = inject(method, *fresh_parts(tiny_pipe))
    selora = {**inject_selora(unet, SeLoRAConfig(), prefix="unet"),
              **inject_selora(text_encoder, SeLoRAConfig(), prefix="text_encoder")}
    assert sorted(f"{p}.{n}" for p, ns in names.items() for n in ns) == sorted(selora)
    assert len(names["text_encoder"]) == 6 * text_encoder.config.num_hidden_layers  # every linear
    assert all(n.endswith(("to_q", "to_k", "to_v", "ff.net.0.proj", "time_emb_proj")) for n in names["unet"])


@pytest.mark.parametrize("name", ["lora", "dylora"])
def test_trainable_counts_rank4(tiny_pipe, name):
    unet, text_encoder = fresh_parts(tiny_pipe)
    base = {"unet": sum(p.numel() for p in unet.parameters()),
            "text_encoder": sum(p.numel() for p in text_encoder.parameters())}
    method = make_method(name)
    names = inject(method, unet, text_encoder)
    report = method.parameter_report()
    for part, model in (("unet", tiny_pipe.unet), ("text_encoder", tiny_pipe.text_encoder)):
        expected = sum(4 * (i + o) for i, o in linear_shapes(model, names[part]))
        assert report[part]["trainable"] == expected
        assert report[part]["base"] == base[part]
        assert report[part]["percent"] == pytest.approx(100 * expected / base[part])
    assert report["total"]["trainable"] == sum(p.numel() for p in method.trainable_parameters())
    # only adapter parameters train
    frozen = [n for n, p in unet.named_parameters() if p.requires_grad and "lora" not in n]
    assert frozen == []
    assert set(method.ranks().values()) == {4}


def test_adalora_counts_include_singular_values(tiny_pipe):
    unet, text_encoder = fresh_parts(tiny_pipe)
    method = AdaLoRAMethod(total_steps=TOTAL_STEPS)
    names = inject(method, unet, text_encoder)
    report = method.parameter_report()
    for part, model in (("unet", tiny_pipe.unet), ("text_encoder", tiny_pipe.text_encoder)):
        expected = sum(6 * (i + o + 1) for i, o in linear_shapes(model, names[part]))
        assert report[part]["trainable"] == expected
    assert set(method.ranks().values()) == {6}


# ------------------------------------------------------------------------------------------------ DyLoRA
def test_dylora_truncated_forward_and_gradients():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    module = DyLoRALinear(base, max_rank=4, alpha=4.0)
    with torch.no_grad():
        for b in module.lora_B:
            b.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    module.double()
    a_full = torch.cat(list(module.lora_A)).detach()
    b_full = torch.cat(list(module.lora_B), 1).detach()
    for index in range(4):
        module.set_active_index(index)
        out = module(x)
        expected = base(x) + (4.0 / (index + 1)) * x @ a_full[:index + 1].T @ b_full[:, :index + 1].T
        torch.testing.assert_close(out, expected)
        module.zero_grad(set_to_none=True)
        out.square().sum().backward()
        for k in range(4):
            trained = k == index
            assert (module.lora_A[k].grad is not None) == trained, (index, k)
            assert (module.lora_B[k].grad is not None) == trained, (index, k)
        assert base.weight.grad is None
    module.set_active_index(None)  # inference: full rank, scale alpha / r
    torch.testing.assert_close(module(x), base(x) + (4.0 / 4) * x @ a_full.T @ b_full.T)


def test_dylora_step_moves_only_the_drawn_component(tiny_pipe):
    unet, text_encoder = fresh_parts(tiny_pipe)
    method = DyLoRAMethod(seed=3)
    inject(method, unet, text_encoder)
    train(method, unet, text_encoder, 2)  # build AdamW momentum in earlier components
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
    method.before_forward(0)
    index = method.last_index
    assert all(m.rank == index + 1 for m in method.modules.values())
    step_loss(unet, text_encoder).backward()
    optimizer.step()
    method.after_step(0)
    assert all(m.active_index is None and m.rank == 4 for m in method.modules.values())
    for name, param in unet.named_parameters():
        if name in before:
            component = int(name.rsplit(".", 1)[1])
            changed = not torch.equal(before[name], param.detach())
            if component != index:
                assert not changed, name
    moved = [n for n in before if not torch.equal(before[n], unet.get_parameter(n).detach())]
    assert moved and all(n.endswith(f".{index}") for n in moved)


def test_dylora_draws_are_uniform_and_seeded():
    draws = [DyLoRAMethod(seed=1).draw_index() for _ in range(3)]
    assert len(set(draws)) == 1
    method = DyLoRAMethod(seed=1)
    counts = torch.bincount(torch.tensor([method.draw_index() for _ in range(4000)]), minlength=4)
    assert counts.min() > 850 and counts.max() < 1150


# ------------------------------------------------------------------------------------------------ AdaLoRA
def manual_orthogonal_regularizer(models):
    from peft.tuners.adalora import SVDLinear

    terms = []
    for model in models:
        for module in model.modules():
            if isinstance(module, SVDLinear):
                a, b = module.lora_A["default"], module.lora_B["default"]
                terms.append(torch.linalg.norm(a @ a.T - torch.eye(a.shape[0]), "fro"))
                terms.append(torch.linalg.norm(b.T @ b - torch.eye(b.shape[1]), "fro"))
    return torch.stack(terms).mean()


def test_adalora_regulariser_and_allocation(tiny_pipe):
    unet, text_encoder = fresh_parts(tiny_pipe)
    method = AdaLoRAMethod(init_r=6, target_r=4, orth_reg_weight=0.5, total_steps=TOTAL_STEPS)
    inject(method, unet, text_encoder)
    n_modules = len(method.ranks())
    extra = method.extra_loss()
    torch.testing.assert_close(extra, 0.5 * manual_orthogonal_regularizer([unet, text_encoder]))
    # the regulariser really reaches the adapter: it alone gives A a gradient (E = 0 blocks the diffusion loss's)
    extra.backward()
    some_a = next(p for n, p in unet.named_parameters() if "lora_A" in n)
    assert some_a.grad is not None and some_a.grad.abs().sum() > 0
    unet.zero_grad(set_to_none=True)
    text_encoder.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="before zero_grad"):
        method.after_step(0)
    calls = []
    original = method.tuner.update_and_allocate
    method.tuner.update_and_allocate = lambda step: (calls.append(step), original(step))
    train(method, unet, text_encoder, TOTAL_STEPS)  # trainer order: the optimizer hook allocates
    assert calls == list(range(TOTAL_STEPS))
    ranks = method.ranks()
    assert method.config.rank_pattern is not None
    assert sum(ranks.values()) == 4 * n_modules  # the final budget: target_r per module on average
    assert min(ranks.values()) < 6
    assert method.parameter_report()["total"]["effective"] < method.parameter_report()["total"]["trainable"]


def test_adalora_needs_total_steps(tiny_pipe):
    with pytest.raises(ValueError, match="total_steps"):
        inject(AdaLoRAMethod(), *fresh_parts(tiny_pipe))


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("name", ["lora", "dylora", "adalora"])
def test_saved_adapter_loads_into_diffusers(tiny_pipe, tmp_path, name):
    """The saved file, loaded by pipe.load_lora_weights, reproduces the trained method's inference output."""
    unet, text_encoder = fresh_parts(tiny_pipe)
    method = make_method(name, **({"init_r": 6, "target_r": 2, "total_steps": 3} if name == "adalora" else {}))
    inject(method, unet, text_encoder)
    # AdaLoRA here without attach: after_step itself allocates, before zero_grad
    train(method, unet, text_encoder, 3, trainer_order=name != "adalora")
    if name == "adalora":
        assert len(set(method.ranks().values())) > 1  # mixed ranks: the export's rank_pattern is exercised
    method.export(tmp_path)
    unet.eval()
    text_encoder.eval()
    with torch.no_grad():
        expected = step_loss(unet, text_encoder, seed=99)
    pipe = copy.deepcopy(tiny_pipe)
    with torch.no_grad():
        plain = step_loss(pipe.unet, pipe.text_encoder, seed=99)
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        loaded = step_loss(pipe.unet, pipe.text_encoder, seed=99)
    assert not torch.allclose(plain, expected)
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-6)


def test_inject_errors():
    with pytest.raises(ValueError, match="rank"):
        LoRAMethod(rank=0)
    with pytest.raises(RuntimeError, match="inject"):
        LoRAMethod().trainable_parameters()
    with pytest.raises(ValueError, match="unknown adapter method"):
        make_method("vera")


def test_save_load_and_registration(tiny_pipe, tmp_path):
    from selora_kernels.config import SeLoRAConfig

    assert sorted(METHODS) == ["adalora", "dylora", "lora", "selora"]
    method = make_method("adalora", SeLoRAConfig(), seed=0, total_steps=4)
    assert isinstance(method, AdaLoRAMethod) and method.total_steps == 4
    trained = make_method("lora", SeLoRAConfig(), seed=0)
    inject(trained, *fresh_parts(tiny_pipe))
    train(trained, *[trained.components[p] for p in ("unet", "text_encoder")], 1)
    trained.save(tmp_path / "adapter.safetensors", extra_metadata={"step": 1})
    fresh = make_method("lora", SeLoRAConfig(), seed=0)
    inject(fresh, *fresh_parts(tiny_pipe))
    assert fresh.load(tmp_path / "adapter.safetensors") == {"step": 1}
    for key, value in trained.adapter_tensors().items():
        torch.testing.assert_close(fresh.adapter_tensors()[key], value)
    other = DyLoRAMethod()
    inject(other, *fresh_parts(tiny_pipe))
    with pytest.raises(ValueError, match="written by method 'lora'"):
        other.load(tmp_path / "adapter.safetensors")
    assert fresh.describe()["method"] == "lora" and fresh.describe()["rank"] == 4


def test_adalora_skipped_fp16_step_skips_allocation(tiny_pipe, caplog):
    """A GradScaler step that finds inf gradients skips optimizer.step (so the post-step hook does not fire):
    after_step then skips the allocation for that step instead of raising; later steps allocate again."""
    import logging

    unet, text_encoder = fresh_parts(tiny_pipe)
    method = AdaLoRAMethod(init_r=6, target_r=4, total_steps=TOTAL_STEPS)
    inject(method, unet, text_encoder)
    calls = []
    original = method.tuner.update_and_allocate
    method.tuner.update_and_allocate = lambda step: (calls.append(step), original(step))
    optimizer = method.make_optimizer(1e-2)
    method.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    some_a = next(p for n, p in unet.named_parameters() if "lora_A" in n)
    with caplog.at_level(logging.DEBUG, logger="selora_kernels.methods.adalora"):
        for step in range(3):
            method.before_forward(step)
            scaler.scale(step_loss(unet, text_encoder, seed=step) + method.extra_loss()).backward()
            if step == 1:
                some_a.grad.view(-1)[0] = float("inf")  # fp16 overflow: the scaler skips this step
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            method.after_step(step)  # the trainer's order: after zero_grad
    assert calls == [0, 2]
    assert "step 1 was skipped" in caplog.text
    # without attach: inf gradients (a skipped step) skip too; no gradients at all is still the call-order error
    plain = AdaLoRAMethod(init_r=6, target_r=4, total_steps=TOTAL_STEPS)
    inject(plain, *fresh_parts(tiny_pipe))
    plain.tuner.update_and_allocate = lambda step: calls.append(("plain", step))
    plain.extra_loss().backward()
    next(p for n, p in plain.container.named_parameters() if "lora_A" in n).grad.view(-1)[0] = float("nan")
    plain.after_step(0)
    assert ("plain", 0) not in calls
    plain.container.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="before zero_grad"):
        plain.after_step(1)
