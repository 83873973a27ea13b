"""kohya / ComfyUI export: on the tiny SD 1.x and SDXL pipelines with grown adapters of unequal ranks, the file
loads with the pipeline's own `load_lora_weights` (diffusers converts kohya keys) and reproduces the adapted
prediction; keys, alphas and header metadata as documented; other families are refused by name."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

from selora_kernels import SeLoRAConfig, expand_modules
from selora_kernels.families import FAMILIES
from selora_kernels.integrations.adapter_io import read_safetensors
from selora_kernels.integrations.kohya_export import (NETWORK_MODULE, export_kohya, kohya_lora_name,
                                                      kohya_state_dict, sgm_unet_path)
from selora_kernels.integrations.peft_method import inject_selora
from selora_kernels.methods import make_method
from selora_kernels.nn.selora_linear import SeLoRALinear

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = re.compile(r"(?P<name>lora_(?:unet|te|te1|te2)_\w+)\.(?:lora_down\.weight|lora_up\.weight|alpha)")


def grow_unequally(modules, b_std=0.03, seed=0):
    """Module i grows to rank 1 + i % 4; B random (small: the adapted prediction stays well conditioned)."""
    modules = list(modules)
    for extra in (1, 2, 3):
        expand_modules([m for i, m in enumerate(modules) if i % 4 >= extra], seed=extra)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            module.lora_B[:, :module.rank] = torch.randn(module.out_features, module.rank, generator=generator) * b_std
    ranks = [m.rank for m in modules]
    assert len(set(ranks)) == 4, ranks


def batch_of(family, pipe):
    generator = torch.Generator().manual_seed(7)
    captions = ["chest x-ray frontal view", "no acute cardiopulmonary abnormality"]
    ids = family.tokenizer(pipe)(captions, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
    return {"pixel_values": torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1, "input_ids": ids,
            "caption": captions}


def predict(family, pipe, batch):
    generator = torch.Generator().manual_seed(1234)
    inputs = family.prepare(pipe, family.noise_scheduler(pipe), batch, generator, torch.device("cpu"))
    with torch.no_grad():
        return family.predict(family.adapted_parts(pipe), inputs).double()


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def check_file(path, modules_by_part, family):
    """Keys, shapes, one alpha, `alpha / r * up @ down` = the trained delta, header metadata."""
    tensors, header = read_safetensors(path)
    names = {KEY.fullmatch(key)["name"] for key in tensors}
    assert all(KEY.fullmatch(key) for key in tensors)
    ranks, alpha = {}, None
    for part, model in modules_by_part.items():
        layers = None if part != "unet" else model.config.layers_per_block
        for path_in_part, module in model.named_modules():
            if not isinstance(module, SeLoRALinear):
                continue
            name = kohya_lora_name(part, path_in_part, family, layers)
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            assert down.dtype == up.dtype == torch.float32
            assert down.shape == (module.rank, module.in_features) and up.shape == (module.out_features, module.rank)
            alpha_tensor = tensors[f"{name}.alpha"]
            assert alpha_tensor.shape == () and alpha_tensor.dtype == torch.float32
            alpha = float(alpha_tensor) if alpha is None else alpha
            assert float(alpha_tensor) == alpha  # one alpha for the whole file (see kohya_export's docstring)
            expected = module.scale * module.lora_B[:, :module.rank].double() @ module.lora_A[:module.rank].double()
            got = alpha / module.rank * up.double() @ down.double()
            assert relative(got, expected.detach()) <= 1e-6, name
            if module.rank == alpha:  # scale 1: the peft export's tensors bit for bit
                assert torch.equal(up, module.live_factors(torch.float32)[1])
            ranks[name] = module.rank
    assert names == set(ranks)
    assert alpha == Counter(ranks.values()).most_common(1)[0][0]
    assert header["ss_network_module"] == NETWORK_MODULE
    assert header["ss_network_dim"] == str(max(ranks.values())) and header["ss_network_alpha"] == str(int(alpha))
    assert json.loads(header["selora_module_ranks"]) == ranks
    assert "lora_adapter_metadata" not in header  # diffusers would read it as a peft config of other keys
    return tensors, ranks


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    family = FAMILIES["sd1"]
    folder = tmp_path_factory.mktemp("tiny_sd1")
    pipe = family.build_tiny(folder, seed=0)
    torch.manual_seed(0)
    method = make_method("selora", SeLoRAConfig(target_modules="released_script"), seed=0,
                         parts=family.method_parts)
    method.inject(family.adapted_parts(pipe, family.method_parts))
    grow_unequally(method.modules.values())
    return family, folder, pipe, method


def test_sd1_kohya_file_loads_with_load_lora_weights_and_predicts_alike(sd1, tmp_path):
    family, folder, pipe, method = sd1
    path = export_kohya(method.components, tmp_path / "sd1_lora.safetensors", family)
    tensors, ranks = check_file(path, method.components, "sd1")
    # SD 1.x: diffusers module paths (sd-scripts' own layout for SD 1.x/2.x), CLIP under lora_te_text_model_
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in ranks
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj" in ranks
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in ranks
    assert {name.split("_")[1] for name in ranks} == {"unet", "te"}

    batch = batch_of(family, pipe)
    expected = predict(family, pipe, batch)
    fresh = family.load(folder)
    assert relative(predict(family, fresh, batch), expected) > 1e-2  # the adapters matter
    fresh.load_lora_weights(str(tmp_path), weight_name=path.name)
    assert relative(predict(family, fresh, batch), expected) <= 1e-5


def test_a_peft_export_file_converts_like_the_model(sd1, tmp_path):
    """The baselines' path: their peft/diffusers export converted (B already rounded to float32 once)."""
    family, _, _, method = sd1
    from_model, ranks, alpha = kohya_state_dict(method.components, family)
    from_file, file_ranks, file_alpha = kohya_state_dict(method.export(tmp_path), "sd1")
    assert (file_ranks, file_alpha) == (ranks, alpha) and from_file.keys() == from_model.keys()
    for key, value in from_model.items():
        torch.testing.assert_close(from_file[key], value, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    family = FAMILIES["sdxl"]
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    pipe = family.build_tiny(folder, seed=0)
    torch.manual_seed(0)
    # every linear of the UNet (time / added embeddings, resnets, proj_in/out, attention, feed-forward) and both
    # text encoders, so every SGM and te1/te2 name is exercised
    modules = {}
    config = SeLoRAConfig(target_modules="all_linear")
    for part in ("unet", "text_encoder", "text_encoder_2"):
        modules.update(inject_selora(getattr(pipe, part), config, prefix=part))
    grow_unequally(modules.values())
    return family, folder, pipe, {part: getattr(pipe, part) for part in ("unet", "text_encoder", "text_encoder_2")}


def test_sdxl_kohya_file_uses_sgm_names_and_loads_with_load_lora_weights(sdxl, tmp_path):
    family, folder, pipe, parts = sdxl
    path = export_kohya(parts, tmp_path / "sdxl_lora.safetensors", family)
    _, ranks = check_file(path, parts, "sdxl")
    assert not any(block in name for name in ranks for block in ("down_blocks", "mid_block", "up_blocks"))
    for name in ("lora_unet_time_embed_0", "lora_unet_label_emb_0_2", "lora_unet_input_blocks_1_0_emb_layers_1",
                 "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_out_0", "lora_unet_middle_block_1_proj_in",
                 "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2", "lora_unet_middle_block_2_emb_layers_1",
                 "lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_projection"):
        assert name in ranks, name
    _, header = read_safetensors(path)
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"

    batch = batch_of(family, pipe)
    expected = predict(family, pipe, batch)
    fresh = family.load(folder)
    assert relative(predict(family, fresh, batch), expected) > 1e-2
    fresh.load_lora_weights(str(tmp_path), weight_name=path.name)
    assert relative(predict(family, fresh, batch), expected) <= 1e-5


def test_sgm_names_map_back_through_diffusers_for_the_real_sdxl_block_layout():
    """SDXL's own structure (3 levels, 2 layers per block, attention in the lower two): diffusers' kohya
    conversion (SGM block remap, key converter, peft renames) turns every SGM name back into its module path."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
            transformer_layers_per_block=(1, 2, 2), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    paths = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(paths) > 100
    sgm = {f"{kohya_lora_name('unet', p, 'sdxl', 2)}.lora_down.weight": p for p in paths}
    assert "lora_unet_input_blocks_8_1_transformer_blocks_1_attn1_to_q.lora_down.weight" in sgm
    assert "lora_unet_output_blocks_5_1_proj_out.lora_down.weight" in sgm
    state = {}
    for key in sgm:
        state[key] = state[key.replace("lora_down", "lora_up")] = torch.zeros(1)
    mapped = _maybe_map_sgm_blocks_to_diffusers(state, unet.config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    converted = convert_unet_state_dict_to_peft(converted)
    assert {key for key in converted if ".lora_A." in key} == {f"unet.{path}.lora_A.weight" for path in paths}


def test_sgm_path_examples_and_refusals():
    assert sgm_unet_path("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2) == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert sgm_unet_path("up_blocks.1.resnets.2.time_emb_proj", 2) == "output_blocks.5.0.emb_layers.1"
    assert sgm_unet_path("mid_block.resnets.1.time_emb_proj", 2) == "middle_block.2.emb_layers.1"
    with pytest.raises(ValueError, match="has no kohya name"):
        kohya_lora_name("unet", "encoder_hid_proj", "sd1")
    with pytest.raises(ValueError, match="need the UNet's layers_per_block"):
        kohya_lora_name("unet", "mid_block.attentions.0.proj_in", "sdxl")
    with pytest.raises(ValueError, match="no kohya prefix for part 'text_encoder_2'"):
        kohya_lora_name("text_encoder_2", "text_projection", "sd1")


@pytest.mark.parametrize("name", ["pixart_sigma", "sd3", "sana", "flux"])
def test_other_families_are_refused_by_name(name, tmp_path):
    from selora_kernels.experiments.finetune import FinetuneOptions

    state = {"unet.a.lora_A.weight": torch.ones(1, 2), "unet.a.lora_B.weight": torch.ones(2, 1)}
    with pytest.raises(ValueError, match=rf"model family '{name}' .*has no kohya/ComfyUI LoRA layout"):
        export_kohya(state, tmp_path / "x.safetensors", FAMILIES[name])
    with pytest.raises(ValueError, match=rf"'{name}'"):
        FinetuneOptions(family=name, export_format="kohya")
    assert not (tmp_path / "x.safetensors").exists()


def test_finetune_refuses_an_auto_detected_family_before_training(tmp_path):
    from selora_kernels.experiments.finetune import FinetuneOptions, run_finetune

    folder = tmp_path / "pixart"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(ValueError, match="'pixart_sigma'"):
        run_finetune(FinetuneOptions(pretrained=str(folder), export_format="kohya", output_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_finetune_program_writes_the_kohya_file(tmp_path):
    from python.finetune import build_parser
    from selora_kernels.experiments.finetune import FinetuneOptions, run_finetune
    from selora_kernels.experiments.options import parse_options

    output = tmp_path / "xray_lora"
    options = parse_options(FinetuneOptions, ["--export-format", "kohya", "--threshold", "1.0", "--interval", "1",
                                              "--epochs", "1", "--max-steps", "2", "--batch-size", "2",
                                              "--synthetic-count", "4", "--output-dir", str(output),
                                              "--no-progress"], build_parser())
    result = run_finetune(options)
    path = output / "kohya" / "xray_lora.safetensors"
    tensors, header = read_safetensors(path)
    assert sum(key.endswith(".alpha") for key in tensors) == len(result.ranks)
    assert sorted(json.loads(header["selora_module_ranks"]).values()) == sorted(result.ranks.values())
    assert header["ss_network_dim"] == str(max(result.ranks.values()))
    assert (output / "peft_lora" / "pytorch_lora_weights.safetensors").is_file()  # the peft export stays
