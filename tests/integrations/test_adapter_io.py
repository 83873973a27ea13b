"""Adapter files: round trip with per-module ranks, atomic writes, clear errors, peft export, merging."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from selora_kernels import SeLoRAConfig, expand_modules, selora_modules
from selora_kernels.integrations import adapter_io
from selora_kernels.integrations.adapter_io import (export_peft_lora, load_adapter, merge_selora, read_adapter,
                                                    save_adapter)
from selora_kernels.integrations.peft_method import inject_selora

CONFIG = SeLoRAConfig(target_modules="all_linear", capacity=3)


def grown_model(seed=0, widths=(6, 8, 4), config=CONFIG):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers)
    modules = list(inject_selora(model, config, prefix="m").values())
    expand_modules(modules, seed=1)
    expand_modules(modules[:1], seed=2)
    expand_modules(modules[:1], seed=3)  # past capacity 3 for the first module: rank 4
    with torch.no_grad():
        for module in modules:
            module.lora_B[:, :module.rank].normal_()
    return model


def test_round_trip_restores_ranks_capacity_trial_rows_and_output(tmp_path):
    model = grown_model()
    path = save_adapter(tmp_path / "a.safetensors", model, CONFIG, extra_metadata={"step": 7})
    x = torch.randn(3, 6)
    expected = model(x)
    torch.manual_seed(0)  # the same base weights as grown_model, fresh rank-1 adapters
    target = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh())
    inject_selora(target, CONFIG, prefix="m")
    meta = load_adapter(path, target, CONFIG)
    assert meta["extra"] == {"step": 7}
    ours, theirs = selora_modules(model), selora_modules(target)
    for name in ours:
        assert theirs[name].rank == ours[name].rank and theirs[name].capacity == ours[name].capacity
        assert torch.equal(theirs[name].trial_row, ours[name].trial_row)
        assert torch.equal(theirs[name].lora_A, ours[name].lora_A)
    assert [m.rank for m in theirs.values()] == [4, 2]
    torch.testing.assert_close(target(x), expected)
    tensors, _ = read_adapter(path)
    assert tensors["m.0.lora_A"].shape == (4, 6) and tensors["m.2.lora_B"].shape == (4, 2)  # live rank only


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    model = grown_model()
    path = save_adapter(tmp_path / "a.safetensors", model, CONFIG)
    before = path.read_bytes()
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(path, model, CONFIG)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


def test_errors_for_other_model_other_config_and_disagreeing_ranks(tmp_path):
    path = save_adapter(tmp_path / "a.safetensors", grown_model(), CONFIG)
    other_shape = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4), nn.Tanh())
    inject_selora(other_shape, CONFIG, prefix="m")
    with pytest.raises(ValueError, match=r"m\.0 was saved with \(in, out\) = \(6, 8\), this model has \(6, 9\)"):
        load_adapter(path, other_shape)
    other_names = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh())
    inject_selora(other_names, CONFIG, prefix="unet")
    with pytest.raises(ValueError, match="another model"):
        load_adapter(path, other_names)
    other_alpha = SeLoRAConfig(target_modules="all_linear", capacity=3, alpha=16.0)
    with pytest.raises(ValueError, match="alpha=8.0.*alpha=16.0"):
        load_adapter(path, grown_model(config=other_alpha), other_alpha)
    # a file whose recorded ranks disagree with its tensors
    tensors, meta = read_adapter(path)
    meta["modules"]["m.2"]["rank"] = 3
    header = {"format": "selora_adapter", "format_version": "1", "modules": json.dumps(meta["modules"])}
    adapter_io.atomic_save_safetensors(tensors, tmp_path / "bad.safetensors", header)
    with pytest.raises(ValueError, match="m.2 records rank 3 but its tensors are A \\(2, 8\\)"):
        load_adapter(tmp_path / "bad.safetensors", grown_model())
    export_peft_lora(tmp_path / "peft", {"unet": grown_model()})
    with pytest.raises(ValueError, match="not a SeLoRA adapter file"):
        load_adapter(tmp_path / "peft" / "pytorch_lora_weights.safetensors", grown_model())


def test_peft_export_layout_and_merge(tmp_path):
    model = grown_model()
    modules = selora_modules(model)
    path = export_peft_lora(tmp_path, {"unet": model})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["lora_adapter_metadata"])
        b0 = handle.get_tensor("unet.0.lora_B.weight")
        assert handle.get_tensor("unet.0.lora_A.weight").shape == (4, 6)
    assert meta["unet.r"] == 4 or meta["unet.r"] == 2
    assert {**{k: meta["unet.r"] for k in ("0", "2")}, **meta["unet.rank_pattern"]} == {"0": 4, "2": 2}
    torch.testing.assert_close(b0, modules["m.0"].lora_B[:, :4] * modules["m.0"].scale)  # scale folded
    x = torch.randn(5, 6)
    expected = model(x)
    merge_selora(model)
    assert not selora_modules(model) and type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
