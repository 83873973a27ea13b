"""Stable Diffusion 3 / 3.5: an MMDiT (SD3Transformer2DModel) on rectified flow, two CLIP encoders + T5.

As diffusers' train_dreambooth_lora_sd3.py with its defaults: text encoders frozen (embeddings and pooled
embeddings from the pipeline's encode_prompt), VAE latents shifted and scaled, timesteps drawn through
logit-normal densities (compute_density_for_timestep_sampling) from the FlowMatchEulerDiscreteScheduler's
training schedule, x_t = (1 - sigma) x_0 + sigma noise, outputs preconditioned (x_0 estimate
x_t - sigma v) against x_0, with compute_loss_weighting_for_sd3's per-sigma weights.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from .base import DENOISER_PART, StepInputs
from .flow_matching import FlowMatchingFamily
from .tiny import clip_text_config, seeded, t5_encoder, tiny_tokenizer, tiny_vae


class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    title = "Stable Diffusion 3 / 3.5"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    objective = "rectified flow, logit-normal t, x0-preconditioned MSE"
    denoiser_attribute = "transformer"
    lora_prefix = "transformer"
    # the SD3 LoRA script's set: joint attention, image and context streams
    default_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                       "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    text_components = ("text_encoder", "text_encoder_2", "text_encoder_3")
    weighting_scheme = "logit_normal"
    precondition_outputs = True
    max_sequence_length = 77

    def build_tiny(self, folder=None, seed: int = 0):
        # heavy: only when a tiny pipeline is built
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection

        tokenizer = tiny_tokenizer()
        with seeded(seed):
            text_encoder = CLIPTextModelWithProjection(clip_text_config(tokenizer))
            text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer))
            text_encoder_3 = t5_encoder(tokenizer, d_model=64)
            transformer = SD3Transformer2DModel(
                sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16)
            vae = tiny_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                           use_post_quant_conv=False)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
            tokenizer_2=tiny_tokenizer(), text_encoder_3=text_encoder_3, tokenizer_3=tiny_tokenizer())
        pipe.set_progress_bar_config(disable=True)
        if folder is not None:
            pipe.save_pretrained(folder)
        return pipe

    def condition(self, pipe, batch, device) -> Dict[str, object]:
        captions = list(batch["caption"])
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, models: Dict[str, nn.Module], inputs: StepInputs) -> torch.Tensor:
        condition = inputs.condition
        prediction = models[DENOISER_PART](inputs.noisy, encoder_hidden_states=condition["encoder_hidden_states"],
                                           pooled_projections=condition["pooled_projections"],
                                           timestep=inputs.timesteps, return_dict=False)[0]
        return self.precondition(prediction, inputs)
