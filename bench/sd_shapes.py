"""The Stable Diffusion 1.5 layer shapes every benchmark uses (bs 8 on a GPU; fewer tokens on a CPU)."""
from __future__ import annotations

from typing import NamedTuple


class Shape(NamedTuple):
    name: str
    batch: int
    tokens: int
    d_in: int
    d_out: int
    note: str


GPU_SHAPES = [
    Shape("unet64_attn_320", 8, 4096, 320, 320, "64x64 latents, level 1 attention q/k/v/out"),
    Shape("unet32_attn_640", 8, 1024, 640, 640, "level 2 attention at 64x64 latents"),
    Shape("unet16_attn_1280", 8, 256, 1280, 1280, "level 3 attention at 64x64 latents"),
    Shape("unet64_ff_proj_320_2560", 8, 4096, 320, 2560, "level 1 ff.net.0.proj (GEGLU input)"),
    Shape("text_enc_768", 8, 77, 768, 768, "CLIP text encoder q/k/v"),
]
CPU_SHAPES = [
    Shape("unet64_attn_320", 2, 1024, 320, 320, "scaled: 2x1024 tokens (GPU: 8x4096)"),
    Shape("unet32_attn_640", 2, 256, 640, 640, "scaled: 2x256 tokens (GPU: 8x1024)"),
    Shape("unet16_attn_1280", 2, 64, 1280, 1280, "scaled: 2x64 tokens (GPU: 8x256)"),
    Shape("unet64_ff_proj_320_2560", 2, 256, 320, 2560, "scaled: 2x256 tokens (GPU: 8x4096)"),
    Shape("text_enc_768", 2, 77, 768, 768, "scaled: 2x77 tokens (GPU: 8x77)"),
]
RANKS = [1, 4, 16]
ALPHA = 8.0
