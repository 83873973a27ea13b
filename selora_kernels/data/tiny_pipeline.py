"""A tiny StableDiffusionPipeline built from configs, offline (no download), for tests and the default run.

Same component types as Stable Diffusion 1.5 (CLIP tokenizer + text encoder, KL VAE, conditional UNet),
sizes cut down so a training step takes a fraction of a second on a CPU. A 64-px image needs a 4-level VAE
(8x8 latents), hence UNet sample_size 8.

The tokenizer is a real byte-level BPE CLIP tokenizer with a small vocabulary (every byte, its end-of-word
form, merges for a medical word list) written to a folder and loaded with `from_pretrained(folder)`:
transformers 5 ignores vocab/merges file arguments given to the constructor.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

# Words that get whole-word BPE merges, so typical captions tokenize to few ids.
TOKENIZER_WORDS = (
    "chest x-ray frontal lateral view no acute cardiopulmonary abnormality the heart size is normal "
    "lungs are clear there pleural effusion pneumothorax focal consolidation opacity right left lower "
    "upper lobe mild moderate severe cardiomegaly atelectasis nodule mass tuberculosis cavity scarring "
    "apical infiltrate bilateral hilar mediastinum within limits of and with a an age gender male female "
    "findings impression stable unchanged small large patient old healed fracture rib spine degenerative "
    "changes thoracic aorta tortuous calcified granuloma"
).split()

TEXT_ENCODER_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                   attention_head_dim=4, norm_num_groups=8)
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=8, sample_size=64)
TINY_RESOLUTION = 64  # pixels; latents are 8x8


def _bytes_to_unicode() -> dict:
    """The byte -> printable character table of GPT-2/CLIP byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_tiny_tokenizer(folder, words=TOKENIZER_WORDS, model_max_length: int = 77) -> Path:
    """Writes vocab.json, merges.txt and the tokenizer configs of a small CLIP BPE tokenizer to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:  # merge left to right: every intermediate token is in the vocabulary
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if f"{pair[0]} {pair[1]}" not in merges:
                merges.append(f"{pair[0]} {pair[1]}")
            vocab.setdefault(merged, len(vocab))
            symbols = [merged] + symbols[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = dict(tokenizer_class="CLIPTokenizer", model_max_length=model_max_length,
                  bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                  pad_token="<|endoftext|>", do_lower_case=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return folder


def build_tiny_pipeline(folder=None, seed: int = 0, words=TOKENIZER_WORDS, vae_config=None):
    """A tiny StableDiffusionPipeline with random weights (seeded). With `folder`, it is also saved there
    (save_pretrained), so `StableDiffusionPipeline.from_pretrained(folder)` reloads it offline. `words`: the
    tokenizer's whole-word merges (the pre-trained base adds its domain's words); `vae_config`: None for VAE_CONFIG."""
    # diffusers / transformers: imported when a pipeline is built, not by everything that imports data/
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(Path(scratch) / "tokenizer", words))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **TEXT_ENCODER_CONFIG))
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**(vae_config or VAE_CONFIG))
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
        pipe.save_pretrained(folder)
    return pipe


def load_pipeline(path: Optional[str] = None, cache_dir=None, seed: int = 0):
    """The pipeline at `path` (a local diffusers folder), or the tiny one (saved under `cache_dir` when given)."""
    from diffusers import StableDiffusionPipeline  # imported when a pipeline is loaded (heavy)

    if path is None:
        if cache_dir is not None and (Path(cache_dir) / "model_index.json").exists():
            path = str(cache_dir)
        else:
            return build_tiny_pipeline(cache_dir, seed=seed)
    if not (Path(path) / "model_index.json").exists():
        raise FileNotFoundError(f"--pretrained {path}: no model_index.json there; expected a local diffusers "
                                f"StableDiffusionPipeline folder (no downloads on this machine)")
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
