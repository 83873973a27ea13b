"""kohya-ss / ComfyUI LoRA files for Stable Diffusion 1.x/2.x and SDXL: the key layout most downstream tools
read (sd-scripts, ComfyUI, AUTOMATIC1111 / Forge, InvokeAI) and diffusers' `load_lora_weights` converts.

Per adapted module, `<lora name>.lora_down.weight` (r x in), `.lora_up.weight` (out x r) and `.alpha` (a 0-d
float32 tensor); a tool adds `alpha / r * up @ down` to the weight. The lora name is the part's prefix
(`lora_unet`, `lora_te` for SD 1.x/2.x's text encoder, `lora_te1` / `lora_te2` for SDXL's) and the module path
with dots as underscores, in the layout sd-scripts trains on:

- SD 1.x / 2.x: diffusers module paths (sd-scripts' SD UNet uses diffusers names):
  `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`;
- SDXL: the SGM (ldm) paths of sd-scripts' SDXL UNet: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`
  (diffusers maps them back with `_maybe_map_sgm_blocks_to_diffusers`; a file mixing both layouts would have
  its SGM keys dropped by it, so every UNet key is written in SGM).

Alpha: one value A for every module (the most common rank), with `(r_m / A) * s * B` as `up`, multiplied in
float64 and rounded once to float32. diffusers turns `.alpha` keys into peft's alpha_pattern under names that
do not match attention projections (those get the most common alpha), so only a file whose alphas are all
equal loads every module at its own `alpha / r_m`; kohya tools read the same alpha per module. Modules at rank
A get scale 1 and the peft export's tensors bit for bit; the others differ from the trained delta by one
float32 rounding of `up` (plus the tool's rounding of A / r_m).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .adapter_io import atomic_save_safetensors, peft_lora_metadata, peft_state_dict, read_safetensors

NETWORK_MODULE = "networks.lora"  # sd-scripts' LoRA network module: what ss_network_module names
# family -> (UNet layout, method part -> kohya prefix, ss_base_model_version)
KOHYA_FAMILIES = {
    "sd1": ("diffusers", {"unet": "lora_unet", "text_encoder": "lora_te"}, "sd_v1"),
    "sd2": ("diffusers", {"unet": "lora_unet", "text_encoder": "lora_te"}, "sd_v2"),
    "sdxl": ("sgm", {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
             "sdxl_base_v1-0"),
}

# The nn.Linear paths of a UNet2DConditionModel / CLIP text encoder whose kohya names diffusers' converter
# (`_convert_unet_lora_key`, `_convert_text_encoder_lora_key`) maps back to the same module; anything else
# would load into the wrong module or fail, so it is refused with its name.
_ATTENTION = (r"(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)"
              r"|ff\.net\.(?:0\.proj|2)))")
_UNET_PATH = re.compile(rf"(?:(?:down_blocks|up_blocks)\.\d+\.|mid_block\.)(?:attentions\.\d+\.{_ATTENTION}"
                        rf"|resnets\.\d+\.time_emb_proj)|time_embedding\.linear_[12]|add_embedding\.linear_[12]")
_TEXT_PATH = re.compile(r"(?:text_model\.)?encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"
                        r"|text_projection")
# transformers 5's CLIP text models dropped the `text_model` wrapper; kohya names keep it (sd-scripts, ComfyUI
# and A1111 read it), and diffusers removes it again for a text encoder without one
_CLIP_WRAPPER = "text_model."
_BLOCK = re.compile(r"(?P<kind>down_blocks|up_blocks)\.(?P<block>\d+)\.(?P<inner>attentions|resnets)\."
                    r"(?P<layer>\d+)\.(?P<rest>.+)")
_MID = re.compile(r"mid_block\.(?P<inner>attentions|resnets)\.(?P<layer>\d+)\.(?P<rest>.+)")
# SGM names of the UNet's top-level linears and of a resnet's one linear
_SGM_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_SGM_RESNET_LINEAR = {"time_emb_proj": "emb_layers.1"}
_SGM_INNER = {"resnets": 0, "attentions": 1}
_SGM_MID = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}


def kohya_family(family) -> str:
    """The family name (a name or a ModelFamily) if it has a kohya layout; ValueError naming it otherwise."""
    name = getattr(family, "name", family)
    if name not in KOHYA_FAMILIES:
        title = getattr(family, "title", name)
        raise ValueError(f"kohya export: model family {name!r} ({title}) has no kohya/ComfyUI LoRA layout here; "
                         f"it is written for {sorted(KOHYA_FAMILIES)} (Stable Diffusion 1.x/2.x and SDXL UNets). "
                         f"Use the peft/diffusers export (peft_lora/, --export-format peft) for {name!r}")
    return name


def sgm_unet_path(path: str, layers_per_block: int) -> str:
    """A diffusers UNet2DConditionModel module path -> the SGM (ldm) path of the same module, as
    `_maybe_map_sgm_blocks_to_diffusers` maps it back: down block b, layer j at input_blocks[1 + b (n + 1) + j],
    up block b, layer j at output_blocks[b (n + 1) + j] (n = layers_per_block), inner index 0 = resnet,
    1 = attention; mid_block = middle_block 0 (resnet), 1 (attention), 2 (resnet)."""
    if path in _SGM_TOP:
        return _SGM_TOP[path]
    if (match := _BLOCK.fullmatch(path)):
        block, layer = int(match["block"]), int(match["layer"])
        index = (1 if match["kind"] == "down_blocks" else 0) + block * (layers_per_block + 1) + layer
        prefix = f"{'input_blocks' if match['kind'] == 'down_blocks' else 'output_blocks'}.{index}"
        inner = _SGM_INNER[match["inner"]]
    elif (match := _MID.fullmatch(path)) and (match["inner"], int(match["layer"])) in _SGM_MID:
        prefix, inner = "middle_block", _SGM_MID[(match["inner"], int(match["layer"]))]
    else:
        raise ValueError(f"kohya export: no SGM name for UNet module {path!r}")
    rest = _SGM_RESNET_LINEAR.get(match["rest"], match["rest"]) if match["inner"] == "resnets" else match["rest"]
    return f"{prefix}.{inner}.{rest}"


def kohya_lora_name(part: str, path: str, family, layers_per_block: Optional[int] = None) -> str:
    """The kohya lora name of module `path` of method part `part` ("unet", "text_encoder", ...)."""
    name = kohya_family(family)
    layout, prefixes, _ = KOHYA_FAMILIES[name]
    if part not in prefixes:
        raise ValueError(f"kohya export: {name} has no kohya prefix for part {part!r}; parts: {sorted(prefixes)}")
    pattern = _UNET_PATH if part == "unet" else _TEXT_PATH
    if not pattern.fullmatch(path):
        raise ValueError(f"kohya export: {part} module {path!r} has no kohya name that diffusers and kohya "
                         f"tools map back to it; exclude it (--exclude-modules) or use the peft export")
    if part != "unet" and path.startswith("encoder."):
        path = _CLIP_WRAPPER + path
    if part == "unet" and layout == "sgm":
        if layers_per_block is None:
            raise ValueError(f"kohya export: {name} writes SGM block names, which need the UNet's "
                             f"layers_per_block (pass unet_config=pipe.unet.config)")
        path = sgm_unet_path(path, layers_per_block)
    return f"{prefixes[part]}_{path.replace('.', '_')}"


def _layers_per_block(source, unet_config) -> Optional[int]:
    config = unet_config
    if config is None and isinstance(source, Mapping) and isinstance(source.get("unet"), nn.Module):
        config = getattr(source["unet"], "config", None)
    if config is None:
        return None
    value = config["layers_per_block"] if isinstance(config, Mapping) else getattr(config, "layers_per_block")
    if not isinstance(value, int):
        # diffusers' SGM mapping reads one number too
        raise ValueError(f"kohya export: SGM block names need one layers_per_block for every block, got {value!r}")
    return value


def _peft_layout(source) -> Dict[str, torch.Tensor]:
    """`<part>.<path>.lora_A.weight` / `.lora_B.weight` (scale folded into B) from any accepted source."""
    if isinstance(source, (str, Path)):
        return read_safetensors(source, what="LoRA file")[0]
    if isinstance(source, Mapping) and source and all(isinstance(v, nn.Module) for v in source.values()):
        tensors = {}
        for part, model in source.items():
            part_tensors = peft_state_dict(model, part, dtype=torch.float64)
            if not part_tensors:
                raise ValueError(f"kohya export: {part} has no SeLoRALinear modules")
            tensors.update(part_tensors)
        return tensors
    if isinstance(source, Mapping) and source and all(isinstance(v, torch.Tensor) for v in source.values()):
        return dict(source)
    raise TypeError(f"kohya export: expected {{part: model}}, a peft-layout state dict "
                    f"(<part>.<path>.lora_A.weight) or the path of a peft/diffusers LoRA file, got "
                    f"{type(source).__name__}")


def _factors(tensors: Dict[str, torch.Tensor]) -> Dict[Tuple[str, str], Tuple[torch.Tensor, torch.Tensor]]:
    """(part, path) -> (A, B) of a peft-layout state dict; modules of rank 0 (an AdaLoRA mask) left out."""
    suffix_a, suffix_b = ".lora_A.weight", ".lora_B.weight"
    stray = sorted(k for k in tensors if not k.endswith((suffix_a, suffix_b)) or "." not in k[:-len(suffix_a)])
    if stray:
        raise ValueError(f"kohya export: {len(stray)} keys are not <part>.<path>.lora_A/B.weight (e.g. {stray[:3]}); "
                         f"expected a peft/diffusers LoRA file (a SeLoRA adapter file converts after "
                         f"load_adapter, from the model)")
    factors = {}
    for key in tensors:
        if not key.endswith(suffix_a):
            continue
        module = key[:-len(suffix_a)]
        if module + suffix_b not in tensors:
            raise ValueError(f"kohya export: {key} has no {module + suffix_b}")
        lora_a, lora_b = tensors[key], tensors[module + suffix_b]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
            raise ValueError(f"kohya export: {module}: A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} are not "
                             f"a LoRA pair (r x in, out x r)")
        if lora_a.shape[0] == 0:
            continue
        part, path = module.split(".", 1)
        factors[(part, path)] = (lora_a, lora_b)
    missing_a = sorted(k for k in tensors if k.endswith(suffix_b) and k[:-len(suffix_b)] + suffix_a not in tensors)
    if missing_a:
        raise ValueError(f"kohya export: {missing_a[0]} has no lora_A")
    if not factors:
        raise ValueError("kohya export: no LoRA modules of rank >= 1 to write")
    return factors


def kohya_state_dict(source, family, unet_config=None) -> Tuple[Dict[str, torch.Tensor], Dict[str, int], int]:
    """(tensors, {lora name: rank}, alpha) of the kohya file for `source` (see export_kohya)."""
    name = kohya_family(family)
    factors = _factors(_peft_layout(source))
    layers_per_block = _layers_per_block(source, unet_config) if KOHYA_FAMILIES[name][0] == "sgm" else None
    names = {key: kohya_lora_name(*key, name, layers_per_block) for key in factors}
    ranks = {names[key]: int(lora_a.shape[0]) for key, (lora_a, _) in factors.items()}
    # the alpha peft_lora_metadata gives the peft export (the most common rank): those modules keep scale 1
    alpha = int(peft_lora_metadata(ranks)["lora_alpha"])
    tensors = {}
    for key, (lora_a, lora_b) in factors.items():
        lora_name, rank = names[key], int(lora_a.shape[0])
        tensors[f"{lora_name}.lora_down.weight"] = lora_a.to(torch.float32)
        tensors[f"{lora_name}.lora_up.weight"] = (lora_b.double() * (rank / alpha)).to(torch.float32)
        tensors[f"{lora_name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors, ranks, alpha


def kohya_metadata(family, ranks: Dict[str, int], alpha: int) -> Dict[str, str]:
    """The sd-scripts header entries of a kohya file (safetensors metadata: strings)."""
    name = kohya_family(family)
    counts = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    histogram = ", ".join(f"r={r}: {n}" for r, n in sorted(counts.items()))
    return {
        "format": "pt",
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(max(ranks.values())),  # the largest rank; each module's is its lora_down's rows
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": KOHYA_FAMILIES[name][2],
        "ss_v2": str(name == "sd2"),
        "ss_training_comment": (f"SeLoRA (self-expanding LoRA) with per-module ranks ({histogram}); every "
                                f"module's alpha is {alpha}, its scale alpha / its own rank"),
        "selora_module_ranks": json.dumps(ranks, sort_keys=True),
    }


def export_kohya(source, path, family, unet_config=None) -> Path:
    """Writes a kohya / ComfyUI LoRA safetensors file at `path` for family `family` ("sd1", "sd2", "sdxl", or a
    ModelFamily; other families raise ValueError naming them).

    source: {part: model} with SeLoRA modules (e.g. `method.components`; B scaled in float64), a peft-layout
    state dict `<part>.<path>.lora_A/B.weight`, or the path of a peft/diffusers LoRA file (what
    `export_peft_lora` or any method's `export` writes). Parts: "unet", "text_encoder" (and SDXL's
    "text_encoder_2"). unet_config: the UNet's config, for SDXL's SGM block numbers (read from a given UNet
    otherwise)."""
    tensors, ranks, alpha = kohya_state_dict(source, family, unet_config)
    return atomic_save_safetensors(tensors, path, kohya_metadata(family, ranks, alpha))
