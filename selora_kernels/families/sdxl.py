"""Stable Diffusion XL: UNet with two CLIP text encoders, the second's pooled embedding and the size/crop
micro-conditions as added embeddings.

As diffusers' train_text_to_image_lora_sdxl.py by default: the UNet is adapted, the text encoders stay
frozen (prompt embeddings and pooled embeddings from the pipeline's encode_prompt), add_time_ids
(original size, crop top-left, target size) = (res, res, 0, 0, res, res) for the centre-cropped square
images, DDPM noise and the target by the scheduler's prediction_type.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from .base import DENOISER_PART, ModelFamily, StepInputs
from .tiny import clip_text_config, seeded, tiny_tokenizer, tiny_vae


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    objective = "epsilon MSE (DDPM), added time ids + pooled embeds"
    text_components = ("text_encoder", "text_encoder_2")
    default_targets = ("to_q", "to_k", "to_v", "to_out.0")  # the SDXL LoRA script's set

    def build_tiny(self, folder=None, seed: int = 0):
        # heavy: only when a tiny pipeline is built
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        tokenizer = tiny_tokenizer()
        with seeded(seed):
            unet = UNet2DConditionModel(
                sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                cross_attention_dim=64, norm_num_groups=8)
            text_encoder = CLIPTextModel(clip_text_config(tokenizer))
            text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer))
            vae = tiny_vae(scaling_factor=0.13025)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing="leading", steps_offset=1)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(), unet=unet,
                                         scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        if folder is not None:
            pipe.save_pretrained(folder)
        return pipe

    def condition(self, pipe, batch, device) -> Dict[str, object]:
        embeds, _, pooled, _ = pipe.encode_prompt(list(batch["caption"]), device=device,
                                                  do_classifier_free_guidance=False)
        height, width = batch["pixel_values"].shape[-2:]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype, device=device)
        return {"encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.repeat(len(embeds), 1)}}

    def predict(self, models: Dict[str, nn.Module], inputs: StepInputs) -> torch.Tensor:
        return models[DENOISER_PART](inputs.noisy, inputs.timesteps,
                                     encoder_hidden_states=inputs.condition["encoder_hidden_states"],
                                     added_cond_kwargs=inputs.condition["added_cond_kwargs"], return_dict=False)[0]
