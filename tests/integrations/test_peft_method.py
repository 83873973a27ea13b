"""SeLoRA as a peft method: SeLoRAConfig where peft takes a LoraConfig, peft's state-dict functions on grown
adapters, save_pretrained / from_pretrained, diffusers' adapter calls, growth attached to the optimizer."""
from __future__ import annotations

import json

import peft
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from selora_kernels import SeLoRAAdamW, SeLoRAConfig, SeLoRALayer, attach_expansion
from selora_kernels.integrations import peft_method
from selora_kernels.nn.selora_linear import selora_modules


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def tiny_clip_text(seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16)).eval()


def train_growing(model, steps=5, seed=1):
    """A few steps with growth attached to the optimizer (threshold 1: every test grows every module)."""
    optimizer = SeLoRAAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-2)
    attachment = attach_expansion(optimizer)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 8), generator=generator)
        out = model(input_ids=ids)
        logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
        loss = logits.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return attachment


def test_config_is_a_peft_config_with_lora_argument_names():
    config = SeLoRAConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    assert isinstance(config, peft.PeftConfig)
    assert (config.r, config.lora_alpha, config.peft_type.value) == (4, 4, "SELORA")
    assert SeLoRAConfig(r_init=2, alpha=16.0).r == 2  # the old spelling is still read
    with pytest.raises(ValueError, match="init_lora_weights"):
        SeLoRAConfig(init_lora_weights=False)


def test_peft_version_outside_the_tested_range_fails_clearly(monkeypatch):
    monkeypatch.delenv(peft_method.UNTESTED_PEFT_ENV, raising=False)
    with pytest.raises(ImportError, match=r"tested on peft>=0\.21\.0,<0\.22\.0; found peft 0\.30\.0"):
        peft_method.check_peft_version("0.30.0")
    monkeypatch.setenv(peft_method.UNTESTED_PEFT_ENV, "1")
    peft_method.check_peft_version("0.30.0")


@pytest.mark.parametrize("build", [tiny_llama, tiny_clip_text], ids=["llama", "clip_text"])
def test_get_peft_model_trains_grows_and_round_trips_save_pretrained(build, tmp_path):
    config = SeLoRAConfig(target_modules=["q_proj", "v_proj"], capacity=3, threshold=1.0, interval=1,
                          lora_alpha=8.0)
    model = get_peft_model(build(), config)
    layers = selora_modules(model)
    assert len(layers) == 4 and all(isinstance(m, SeLoRALayer) for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    train_growing(model)
    ranks = {name: m.rank for name, m in layers.items()}
    assert set(ranks.values()) == {6}  # 1 + 5 growths, past capacity 3 -> 7

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SELORA" and saved["r"] == 1
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(input_ids=ids)
        expected = out.logits if hasattr(out, "logits") else out.last_hidden_state
    loaded = PeftModel.from_pretrained(build(), tmp_path, is_trainable=True)
    assert isinstance(loaded.peft_config["default"], SeLoRAConfig)
    loaded_layers = selora_modules(loaded)
    assert {n: m.rank for n, m in loaded_layers.items()} == ranks
    assert {m.capacity for m in loaded_layers.values()} == {7}
    with torch.no_grad():
        out = loaded(input_ids=ids)
        actual = out.logits if hasattr(out, "logits") else out.last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)  # s = 8 folds and unfolds exactly
    for name, module in layers.items():
        assert torch.equal(loaded_layers[name].lora_B, module.lora_B)


def test_peft_state_dict_functions_round_trip_grown_adapters():
    model = tiny_clip_text()
    inject_adapter_in_model(SeLoRAConfig(target_modules="all_linear", capacity=3, threshold=1.0, interval=1,
                                         lora_alpha=4.0, r=2), model)
    train_growing(model, steps=2)
    state = get_peft_model_state_dict(model)
    layers = selora_modules(model)
    name, module = next(iter(layers.items()))
    assert module.rank == 4 and module.capacity == 7
    # live slots only, the scale s = 4 / 2 folded into B: the LoRA layout diffusers infers ranks from
    assert state[f"{name}.lora_A.weight"].shape == (4, module.in_features)
    torch.testing.assert_close(state[f"{name}.lora_B.weight"], module.lora_B[:, :4] * 2.0, rtol=0, atol=0)
    assert len(state) == 2 * len(layers)

    fresh = tiny_clip_text()
    inject_adapter_in_model(SeLoRAConfig(target_modules="all_linear", capacity=3, lora_alpha=4.0, r=2), fresh)
    result = set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys
    for name, module in selora_modules(fresh).items():
        source = layers[name]
        assert (module.rank, module.capacity) == (source.rank, source.capacity)
        assert torch.equal(module.lora_A, source.lora_A) and torch.equal(module.lora_B, source.lora_B)
        assert module.reallocated  # capacity 3 -> 7 at load: DDP built before must not average these


def test_set_peft_model_state_dict_rejects_a_file_of_another_model():
    model = tiny_clip_text()
    inject_adapter_in_model(SeLoRAConfig(target_modules=["q_proj"]), model)
    name = next(iter(selora_modules(model)))
    bad = {f"{name}.lora_A.weight": torch.zeros(2, 5), f"{name}.lora_B.weight": torch.zeros(16, 2)}
    with pytest.raises(ValueError, match=r"q_proj: loaded A \(2, 5\)"):
        set_peft_model_state_dict(model, bad)


def test_diffusers_adapter_calls_and_merge_and_unload():
    model = get_peft_model(tiny_clip_text(), SeLoRAConfig(target_modules=["q_proj", "out_proj"]))
    for module in selora_modules(model).values():
        with torch.no_grad():
            module.lora_B[:, :1].normal_()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        adapted = model(input_ids=ids).last_hidden_state
        with model.disable_adapter():
            base = model(input_ids=ids).last_hidden_state
        layer = next(iter(selora_modules(model).values()))
        layer.scale_layer(0.0)
        for module in selora_modules(model).values():
            module.scale_layer(0.0)
        zero_scale = model(input_ids=ids).last_hidden_state
        for module in selora_modules(model).values():
            module.unscale_layer()
        restored = model(input_ids=ids).last_hidden_state
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(zero_scale, base)
    torch.testing.assert_close(restored, adapted, rtol=0, atol=0)
    merged = model.merge_and_unload()
    assert not selora_modules(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).last_hidden_state, adapted, rtol=1e-5, atol=1e-5)


def test_diffusers_add_adapter_injects_selora_into_a_unet():
    from selora_kernels.data.tiny_pipeline import build_tiny_pipeline
    unet = build_tiny_pipeline().unet
    unet.add_adapter(SeLoRAConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    layers = selora_modules(unet)
    assert len(layers) == 32 and {m.rank for m in layers.values()} == {4}
    assert all(m.lora_A[:4].std() < 0.5 for m in layers.values())  # N(0, 1/r), not Kaiming-uniform bounds
    unet.disable_adapters()
    assert all(m.disable_adapters for m in layers.values())
    unet.enable_adapters()
    assert not any(m.disable_adapters for m in layers.values())


def test_attached_growth_takes_the_explicit_calls_decisions():
    """attach_expansion and before_forward/after_step in the loop decide the same, step for step."""
    from selora_kernels import ExpansionController

    def run(attached):
        model = tiny_clip_text()
        inject_adapter_in_model(SeLoRAConfig(target_modules="all_linear", threshold=1.05, interval=2), model)
        optimizer = SeLoRAAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        if attached:
            controller = attach_expansion(optimizer).controller
        else:
            controller = ExpansionController(model, optimizer, SeLoRAConfig(threshold=1.05, interval=2))
        generator = torch.Generator().manual_seed(2)
        for step in range(8):
            if not attached:
                controller.before_forward(step)
            ids = torch.randint(0, 64, (4, 8), generator=generator)
            F.mse_loss(model(input_ids=ids).last_hidden_state, torch.zeros(4, 8, 16)).backward()
            optimizer.step()
            optimizer.zero_grad()
            if not attached:
                controller.after_step(step)
        return controller.history, [m.lora_B.detach().clone() for m in selora_modules(model).values()]

    explicit, explicit_b = run(False)
    attached, attached_b = run(True)
    assert attached == explicit and any(d.expanded for d in explicit) and not all(d.expanded for d in explicit)
    assert all(torch.equal(a, b) for a, b in zip(attached_b, explicit_b))


def test_grad_scaler_skipped_step_moves_the_test_to_the_next_step():
    """An fp16-overflowed step (GradScaler skips optimizer.step) is counted and its test retried next step,
    as the explicit after_step does."""
    model = tiny_clip_text()
    inject_adapter_in_model(SeLoRAConfig(target_modules=["q_proj"], threshold=1.0, interval=2), model)
    optimizer = SeLoRAAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    controller = attach_expansion(optimizer, grad_scaler=scaler).controller
    generator = torch.Generator().manual_seed(2)
    for step in range(4):
        ids = torch.randint(0, 64, (4, 8), generator=generator)
        loss = model(input_ids=ids).last_hidden_state.square().mean()
        if step == 1:  # the due step overflows
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    # due at steps 1 and 3 (interval 2): step 1 was skipped, so its test ran at step 2 (two q_proj modules)
    assert [d.step for d in controller.history] == [2, 2, 3, 3]
    assert controller.step_count == 4
