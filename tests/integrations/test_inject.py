"""Injection into SD-1.5-shaped models (built from configs on the meta device: no weights, no memory)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from selora_kernels import SeLoRAConfig, SeLoRALinear, selora_modules
from selora_kernels.integrations.peft_method import inject_selora
from selora_kernels.integrations.targets import live_parameter_count

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=768)


@pytest.fixture(scope="module")
def sd15_models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    return unet, text_encoder


def test_reference_code_counts_on_sd15_shapes(sd15_models):
    unet, text_encoder = sd15_models
    config = SeLoRAConfig(target_modules="reference_code")
    text_modules = inject_selora(text_encoder, config, prefix="text_encoder")
    unet_modules = inject_selora(unet, config, prefix="unet")
    assert len(text_modules) == 72
    assert live_parameter_count(text_encoder) == 165_888
    assert live_parameter_count(unet) == 310_016
    assert all(name.startswith("unet.") for name in unet_modules)
    # transformers 5 has no `text_model.` level: names follow the installed model's own structure
    assert any(name.endswith("encoder.layers.0.self_attn.q_proj") for name in text_modules)
    # everything but the adapters is frozen
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert selora_modules([unet, text_encoder]).keys() == {**unet_modules, **text_modules}.keys()
    # injecting again finds the same modules and replaces nothing
    again = inject_selora(unet, config, prefix="unet")
    assert again.keys() == unet_modules.keys() and all(again[k] is unet_modules[k] for k in again)


def test_patterns_presets_and_exclusions():
    model = nn.Sequential()
    model.add_module("attn", nn.ModuleDict({"to_q": nn.Linear(4, 4), "to_k": nn.Linear(4, 4)}))
    model.add_module("mlp", nn.Linear(4, 2))
    model.add_module("norm", nn.LayerNorm(2))
    got = inject_selora(model, SeLoRAConfig(target_modules=["to_q"]))
    assert list(got) == ["attn.to_q"]
    assert isinstance(model.attn.to_q, SeLoRALinear) and type(model.attn.to_k) is nn.Linear
    assert not model.norm.weight.requires_grad and not model.attn.to_k.weight.requires_grad
    model2 = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    got = inject_selora(model2, SeLoRAConfig(target_modules="all_linear", exclude_modules=["1"]))
    assert list(got) == ["0"]
    model3 = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    assert list(inject_selora(model3, SeLoRAConfig(target_modules=[r"\d"]), prefix="net")) == ["net.0", "net.1"]
    model4 = nn.ModuleDict({"block_a": nn.Linear(3, 3), "block_b": nn.Linear(3, 3)})
    assert list(inject_selora(model4, SeLoRAConfig(target_modules=["*_b"]))) == ["block_b"]


def test_nothing_matched_lists_linear_names():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"matched none .*\[0, 2\]"):
        inject_selora(model, SeLoRAConfig(target_modules=["to_q"]))
    with pytest.raises(ValueError, match="unknown preset"):
        inject_selora(model, SeLoRAConfig(target_modules="everything"))


def test_injected_model_computes_the_same_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 3))
    x = torch.randn(4, 5)
    before = model(x)
    inject_selora(model, SeLoRAConfig(target_modules="all_linear"))
    torch.testing.assert_close(model(x), before)
