"""Sana: a linear-attention DiT (SanaTransformer2DModel) on DC-AE latents, conditioned on Gemma-2 hidden states.

As diffusers' train_dreambooth_lora_sana.py with its defaults: Gemma frozen (embeddings and attention mask
from the pipeline's encode_prompt, 300 tokens, no complex human instruction), DC-AE latents (deterministic,
no posterior to sample) times the scaling factor, flow matching with uniform t (weighting scheme "none")
over the training schedule of the scheduler config read as a FlowMatchEulerDiscreteScheduler (a Sana
folder's DPM-Solver `flow_shift` is not one of its keys, so the schedule is unshifted, as in the script),
target noise - x_0, and plain MSE.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from .base import DENOISER_PART, CappedTextLength, StepInputs
from .flow_matching import FlowMatchingFamily
from .tiny import TEXT_LENGTH, seeded, tiny_tokenizer

# a 4-stage DC-AE (8x down, so 64 px -> 8x8 latents) at the widths of diffusers' tiny Sana test
DC_AE_STAGES = 4
DC_AE_CONFIG = dict(
    in_channels=3, latent_channels=4, attention_head_dim=2,
    encoder_block_types=("ResBlock",) * (DC_AE_STAGES - 1) + ("EfficientViTBlock",),
    decoder_block_types=("ResBlock",) * (DC_AE_STAGES - 1) + ("EfficientViTBlock",),
    encoder_block_out_channels=(8,) * DC_AE_STAGES, decoder_block_out_channels=(8,) * DC_AE_STAGES,
    encoder_qkv_multiscales=((),) * (DC_AE_STAGES - 1) + ((5,),),
    decoder_qkv_multiscales=((),) * (DC_AE_STAGES - 1) + ((5,),),
    encoder_layers_per_block=(1,) * DC_AE_STAGES, decoder_layers_per_block=(1,) * DC_AE_STAGES,
    downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407)


class Sana(CappedTextLength, FlowMatchingFamily):
    name = "sana"
    title = "Sana"
    pipeline_class_names = ("SanaPipeline",)
    objective = "flow matching (noise - x0), uniform t, MSE"
    denoiser_attribute = "transformer"
    lora_prefix = "transformer"
    default_targets = ("to_q", "to_k", "to_v")  # the Sana LoRA script's default (self- and cross-attention)
    max_sequence_length = 300
    complex_human_instruction: Optional[Sequence[str]] = None  # the script's default: off

    def build_tiny(self, folder=None, seed: int = 0):
        # heavy: only when a tiny pipeline is built
        from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
        from transformers import Gemma2Config, Gemma2Model

        tokenizer = tiny_tokenizer(TEXT_LENGTH)
        with seeded(seed):
            text_encoder = Gemma2Model(Gemma2Config(
                vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, attn_implementation="eager"))
            transformer = SanaTransformer2DModel(
                patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
                attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8,
                cross_attention_dim=16, caption_channels=16, sample_size=8)
            vae = AutoencoderDC(**DC_AE_CONFIG)
        # what Sana folders ship (the pipeline samples with it; training reads its config as flow matching)
        scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                                prediction_type="flow_prediction")
        pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                            scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        if folder is not None:
            pipe.save_pretrained(folder)
        return pipe

    def encode_images(self, pipe, pixels, generator):
        vae = pipe.vae  # DC-AE: a deterministic encoder, nothing drawn
        return vae.encode(pixels.to(dtype=vae.dtype)).latent * vae.config.scaling_factor

    def condition(self, pipe, batch, device) -> Dict[str, object]:
        embeds, mask, _, _ = pipe.encode_prompt(
            list(batch["caption"]), do_classifier_free_guidance=False, device=device, clean_caption=False,
            max_sequence_length=self.sequence_length(pipe),
            complex_human_instruction=self.complex_human_instruction)
        # the script casts the (bf16 Gemma) embeddings to the transformer's dtype
        return {"encoder_hidden_states": embeds.to(self.denoiser(pipe).dtype), "encoder_attention_mask": mask}

    def predict(self, models: Dict[str, nn.Module], inputs: StepInputs) -> torch.Tensor:
        return models[DENOISER_PART](hidden_states=inputs.noisy,
                                     encoder_hidden_states=inputs.condition["encoder_hidden_states"],
                                     encoder_attention_mask=inputs.condition["encoder_attention_mask"],
                                     timestep=inputs.timesteps, return_dict=False)[0]
