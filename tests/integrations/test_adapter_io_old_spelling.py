"""Adapter files written before the released-script rename ("reference_code") still load."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from selora_kernels import SeLoRAConfig, inject_selora, load_adapter, save_adapter


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(4, 4)


def _model(config):
    torch.manual_seed(0)
    model = Attention()
    inject_selora(model, config, prefix="unet")
    return model


def test_adapter_saved_with_the_old_preset_name_loads(tmp_path):
    config = SeLoRAConfig(target_modules="released_script", trial="released_script")
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, _model(config), config)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    saved = json.loads(metadata["selora_config"])
    assert saved["trial"] == saved["target_modules"] == "released_script"
    saved["trial"] = saved["target_modules"] = "reference_code"
    metadata["selora_config"] = json.dumps(saved)
    save_file(load_file(str(path)), str(path), metadata=metadata)
    load_adapter(path, _model(config), SeLoRAConfig(target_modules="reference_code", trial="reference_code"))
    load_adapter(path, _model(config), config)
