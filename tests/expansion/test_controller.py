"""ExpansionController: decisions, max_rank, reference_code mode, AMP/accumulation scaling, and the drop-in
use in a loop shaped like diffusers' train_text_to_image_lora.py (saved adapter loaded by load_lora_weights)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selora_kernels import SeLoRAAdamW, SeLoRAConfig
from selora_kernels.expansion.controller import ExpansionController
from selora_kernels.expansion.fisher import batched_fisher_scores
from selora_kernels.integrations.peft_method import inject_selora


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_model(seed=0, width=8):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 4))
    inject_selora(model, SeLoRAConfig(target_modules="all_linear"), prefix="toy")
    return model


def batches(n, seed=1, batch=5):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=gen), torch.randn(batch, 4, generator=gen)) for _ in range(n)]


def train(model, controller, optimizer, data, closure_mode=False):
    for step, (x, y) in enumerate(data):
        controller.before_forward(step)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        closure = (lambda x=x, y=y: F.mse_loss(model(x), y)) if closure_mode else None
        controller.after_step(step, closure=closure)


def test_threshold_one_expands_every_module_at_every_test():
    model = toy_model()
    config = SeLoRAConfig(threshold=1.0, interval=3)
    opt = SeLoRAAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = ExpansionController(model, opt, config)
    train(model, controller, opt, batches(9))
    assert controller.ranks() == {"toy.0": 4, "toy.2": 4}  # tests after steps 2, 5, 8
    assert [d.step for d in controller.history] == [2, 2, 5, 5, 8, 8]
    assert all(d.expanded and d.ratio >= 1.0 for d in controller.history)
    assert controller.step_count == 9


def test_high_threshold_never_expands_and_function_is_unchanged_by_the_test():
    model = toy_model()
    opt = SeLoRAAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = ExpansionController(model, opt, SeLoRAConfig(threshold=1e9, interval=1))
    train(model, controller, opt, batches(3))
    assert controller.ranks() == {"toy.0": 1, "toy.2": 1}
    assert len(controller.history) == 6 and not any(d.expanded for d in controller.history)
    assert all(1.0 <= d.ratio < 1e9 for d in controller.history)


def test_max_rank_caps_growth():
    model = toy_model()
    opt = SeLoRAAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = ExpansionController(model, opt, SeLoRAConfig(threshold=1.0, interval=1, max_rank=3))
    train(model, controller, opt, batches(6))
    assert set(controller.ranks().values()) == {3}
    assert not any(d.expanded for d in controller.history if d.step >= 2)


def test_ratio_equals_per_module_fisher_scores():
    model = toy_model()
    controller = ExpansionController(model, None, SeLoRAConfig(threshold=1e9, interval=1))
    x, y = batches(1)[0]
    controller.before_forward(0)
    F.mse_loss(model(x), y).backward()
    expected = [m.fisher_scores() for m in controller.module_list]
    got = batched_fisher_scores(controller.module_list)
    for e, g in zip(expected, got):
        assert math.isclose(e.ratio, g.ratio, rel_tol=1e-9) and math.isclose(e.original, g.original, rel_tol=1e-9)
    decisions = controller.after_step(0)
    assert [d.ratio for d in decisions] == pytest.approx([e.ratio for e in expected], rel=1e-9)


def test_trial_slot_stays_out_of_the_optimizer():
    model = toy_model()
    opt = SeLoRAAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1, weight_decay=0.1)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    controller = ExpansionController(model, opt, SeLoRAConfig(threshold=1e9, interval=1))
    modules = controller.module_list
    assert all(id(m.trial_row) not in held for m in modules)
    trials = [m.trial_row.clone() for m in modules]
    x, y = batches(1)[0]
    controller.before_forward(0)
    F.mse_loss(model(x), y).backward()
    opt.step()
    controller.after_step(0)
    for module, trial in zip(modules, trials):
        assert torch.equal(module.trial_row, trial)
        assert torch.count_nonzero(module.lora_B[:, module.rank:]) == 0
        assert torch.count_nonzero(module.lora_A[module.rank:]) == 0


def test_optimizer_without_adapters_is_rejected():
    model = toy_model()
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="toy.0.lora_A is not in the optimizer"):
        ExpansionController(model, opt, SeLoRAConfig())


class StubScaler:
    """The two GradScaler methods the controller reads."""

    def __init__(self, scale):
        self.scale = scale

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale


def measured_scores(model, data, scale=1.0, accumulation=1, scaler=None):
    controller = ExpansionController(model, None, SeLoRAConfig(threshold=1e9, interval=1), grad_scaler=scaler,
                                     gradient_accumulation_steps=accumulation)
    controller.before_forward(0)
    for x, y in data:
        (F.mse_loss(model(x), y) * scale / accumulation).backward()
    from selora_kernels.expansion.fisher import batched_fisher_scores as scores

    fisher_scale = (accumulation / (scaler.get_scale() if scaler else 1.0)) ** 2
    return scores(controller.module_list, fisher_scale=fisher_scale), controller


def test_grad_scaler_and_accumulation_give_eq3_fisher():
    data = batches(2, batch=4)
    plain, _ = measured_scores(toy_model(), data[:1])
    scaled, _ = measured_scores(toy_model(), data[:1], scale=1024.0, scaler=StubScaler(1024.0))
    for a, b in zip(plain, scaled):
        assert math.isclose(a.original, b.original, rel_tol=1e-4) and math.isclose(a.ratio, b.ratio, rel_tol=1e-4)
    # two micro-batches of 4 with loss / 2 == per-sample Fisher over the 8 samples
    accumulated, _ = measured_scores(toy_model(), data, accumulation=2)
    each = [measured_scores(toy_model(), [d])[0] for d in data]
    for i, score in enumerate(accumulated):
        mean_of_halves = (each[0][i].original + each[1][i].original) / 2
        assert score.samples == 8 and math.isclose(score.original, mean_of_halves, rel_tol=1e-4)


def test_non_finite_step_is_skipped_and_retried():
    model = toy_model()
    opt = SeLoRAAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = ExpansionController(model, opt, SeLoRAConfig(threshold=1.0, interval=5))
    (x, y), (x2, y2) = batches(2)
    controller.before_forward(4)
    (F.mse_loss(model(x), y) * float("inf")).backward()  # an AMP overflow: optimizer step skipped
    opt.zero_grad()
    assert controller.after_step(4) == [] and controller.ranks() == {"toy.0": 1, "toy.2": 1}
    assert controller.is_due(5)  # retried at the next step
    controller.before_forward(5)
    F.mse_loss(model(x2), y2).backward()
    opt.step()
    opt.zero_grad()
    assert len(controller.after_step(5)) == 2 and controller.ranks() == {"toy.0": 2, "toy.2": 2}
    assert not controller.is_due(6)


def test_non_finite_input_raises_at_the_decision_unless_the_scaler_skipped_the_step():
    (x, y), = batches(1)
    x = x.clone()
    x[2, 1] = float("nan")  # bad data reaching the first layer (and, through it, the second)
    model = toy_model()
    controller = ExpansionController(model, None, SeLoRAConfig(threshold=1.0, interval=1))
    controller.before_forward(0)
    F.mse_loss(model(x), y).backward()  # no check in the forward (no host sync per layer)
    with pytest.raises(ValueError, match=r"toy\.0 \(1 input rows\), toy\.2 \(1 input rows\)"):
        controller.after_step(0)
    assert not any(m.measuring for m in controller.module_list)  # left consistent
    # the same inputs under a GradScaler that skipped the step: an fp16 overflow, retried next step
    scaler = StubScaler(1024.0)
    model = toy_model()
    controller = ExpansionController(model, None, SeLoRAConfig(threshold=1.0, interval=1), grad_scaler=scaler)
    controller.before_forward(0)
    F.mse_loss(model(x), y).backward()
    scaler.scale = 512.0  # GradScaler.update() halves the scale when it skipped the step
    assert controller.after_step(0) == [] and controller.is_due(1)


def test_non_finite_input_raises_before_the_optimizer_moves_anything():
    (x, y), = batches(1)
    x = x.clone()
    x[0, 0] = float("inf")
    model = toy_model()
    opt = SeLoRAAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = ExpansionController(model, opt, SeLoRAConfig(threshold=1.0, interval=1))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    controller.before_forward(0)
    F.mse_loss(model(x), y).backward()
    with pytest.raises(ValueError, match=r"toy\.0 \(1 input rows\)"):
        opt.step()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # nothing moved


def test_reference_code_mode_reproduces_the_released_rule():
    model = toy_model(width=5)
    config = SeLoRAConfig(trial="reference_code", threshold=1e9, interval=1)
    opt = SeLoRAAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = ExpansionController(model, opt, config)
    modules = controller.module_list
    (x, y), = batches(1)
    for step in range(2):  # two steps so B is non-zero and both passes carry signal
        controller.before_forward(step)
        F.mse_loss(model(x), y).backward()
        first = [float(m.lora_A.grad[:m.rank].square().sum() + m.lora_B.grad[:, :m.rank].square().sum())
                 for m in modules]
        opt.step()
        opt.zero_grad()
        twin = copy.deepcopy(model)  # theta_{t+1}: the second pass with K = 0 sees only the live slots
        F.mse_loss(twin(x), y).backward()
        twin_modules = [m for m in twin.modules() if hasattr(m, "trial_row")]
        second = [float(m.lora_A.grad[:m.rank].square().sum() + m.lora_B.grad[:, :m.rank].square().sum())
                  for m in twin_modules]
        trials = [m.trial_row.clone() for m in modules]
        with torch.no_grad():
            before = model(x)
        decisions = controller.after_step(step, closure=lambda: F.mse_loss(model(x), y))
        assert [d.ratio for d in decisions] == pytest.approx([s / f for f, s in zip(first, second)], rel=1e-5)
        # the test leaves no trace: gradients, trial rows, ranks and the function are as before
        assert all(m.lora_A.grad is None and m.rank == 1 for m in modules)
        assert all(torch.equal(m.trial_row, t) for m, t in zip(modules, trials))
        with torch.no_grad():
            assert torch.equal(model(x), before)
    with pytest.raises(ValueError, match="closure"):
        controller.before_forward(2)
        controller.after_step(2)


def test_reference_code_expansion_resets_adam_and_adopts_a_fresh_row():
    model = toy_model(width=5)
    config = SeLoRAConfig(trial="reference_code", threshold=1e-9, interval=1)
    opt = SeLoRAAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = ExpansionController(model, opt, config)
    modules = controller.module_list
    (x, y), = batches(1)
    controller.before_forward(0)
    F.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    measured_trials = [m.trial_row.clone() for m in modules]
    decisions = controller.after_step(0, closure=lambda: F.mse_loss(model(x), y))
    assert all(d.expanded for d in decisions) and controller.ranks() == {"toy.0": 2, "toy.2": 2}
    for module, trial in zip(modules, measured_trials):
        assert not opt.state[module.lora_A] and not opt.state[module.lora_B]  # whole-layer reset
        assert not torch.equal(module.lora_A[1], trial)  # a fresh row, not the measured K
        bound = math.sqrt(6 / module.in_features)
        assert 0 < module.lora_A[1].abs().max() <= bound
    assert controller.expanded_once == {"toy.0", "toy.2"}
    # the controller state round-trips
    state = controller.state_dict()
    other = ExpansionController(model, opt, config)
    other.load_state_dict(state)
    assert other.expanded_once == controller.expanded_once and other.step_count == 1
    assert other.history == controller.history


# ------------------------------------------------------------------ drop into a diffusers-style loop
def test_drop_in_diffusers_loop_and_load_lora_weights(tmp_path):
    """The structure of diffusers' examples/text_to_image/train_text_to_image_lora.py with SeLoRA lines."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from selora_kernels.integrations.adapter_io import export_peft_lora, peft_metadata, peft_state_dict
    from selora_kernels.data.tiny_pipeline import build_tiny_pipeline

    base = tmp_path / "base"
    pipe = build_tiny_pipeline(base, seed=0)
    accelerator = Accelerator(gradient_accumulation_steps=2, mixed_precision="no")
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    config = SeLoRAConfig(threshold=1.0, interval=2)                        # SeLoRA line 1
    inject_selora(unet, config, prefix="unet")                              # replaces unet.add_adapter(...)
    lora_layers = list(filter(lambda p: p.requires_grad, unet.parameters()))
    optimizer = SeLoRAAdamW(lora_layers, lr=1e-3)                           # SeLoRA line 2 (was AdamW)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 64, 64, generator=gen) * 2 - 1
    captions = ["the heart size is normal", "right lower lobe opacity"] * 4
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    loader = torch.utils.data.DataLoader(list(zip(images, ids)), batch_size=2)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    controller = ExpansionController(unet, optimizer, config,                # SeLoRA line 3
                                     gradient_accumulation_steps=accelerator.gradient_accumulation_steps)
    global_step = 0
    for pixel_values, input_ids in loader:
        with accelerator.accumulate(unet):
            controller.before_forward(global_step)                          # SeLoRA line 4
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            controller.after_step(global_step)                              # SeLoRA line 5
            global_step += 1
    assert global_step == 2 and controller.total_rank() == 2 * len(controller.modules)
    unwrapped = accelerator.unwrap_model(unet)
    # the script's own save, fed with our state dict and per-module ranks
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora_script", unet_lora_layers=peft_state_dict(unwrapped),
                                              unet_lora_adapter_metadata=peft_metadata(unwrapped))
    export_peft_lora(tmp_path / "lora_export", {"unet": unwrapped})

    def generate(p):
        return p("the heart size is normal", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(3), output_type="np").images

    with torch.no_grad():
        ours = generate(pipe)
        for folder in ("lora_script", "lora_export"):
            loaded = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
            loaded.set_progress_bar_config(disable=True)
            loaded.load_lora_weights(tmp_path / folder)
            assert abs(generate(loaded) - ours).max() < 1e-4
    assert all(m.lora_B.abs().max() > 0 for m in controller.module_list)  # the adapter is not a no-op
