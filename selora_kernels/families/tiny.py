"""Pieces of the tiny pipelines the families build from configs (random weights, nothing downloaded).

Every tokenizer is the tiny byte-level BPE one of data/tiny_pipeline.py (a T5 encoder reads its ids as
well as any: the ids only have to be below the vocabulary size); the encoders are cut to a few layers.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from ..data.tiny_pipeline import TEXT_ENCODER_CONFIG, VAE_CONFIG, write_tiny_tokenizer

TEXT_LENGTH = 32  # tokens a tiny tokenizer pads to (the T5 pipelines' max_sequence_length in the tests)


@contextlib.contextmanager
def seeded(seed: int):
    """Weights drawn from `seed`; the caller's global RNG state is restored afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def tiny_tokenizer(model_max_length: int = 77):
    from transformers import CLIPTokenizer  # heavy: only when a tiny pipeline is built

    with tempfile.TemporaryDirectory() as scratch:
        return CLIPTokenizer.from_pretrained(write_tiny_tokenizer(Path(scratch) / "tokenizer",
                                                                  model_max_length=model_max_length))


def clip_text_config(tokenizer, **overrides):
    from transformers import CLIPTextConfig  # heavy: only when a tiny pipeline is built

    return CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          **dict(TEXT_ENCODER_CONFIG, **overrides))


def t5_encoder(tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel  # heavy: only when a tiny pipeline is built

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=64, d_kv=8, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))


def tiny_vae(**overrides):
    from diffusers import AutoencoderKL  # heavy: only when a tiny pipeline is built

    return AutoencoderKL(**dict(VAE_CONFIG, **overrides))
