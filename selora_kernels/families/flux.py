"""Flux.1: an MMDiT + single-stream DiT (FluxTransformer2DModel) on 2x2-packed latents, CLIP pooled + T5.

As diffusers' train_dreambooth_lora_flux.py with its defaults: text encoders frozen (T5 embeddings, 512
tokens, CLIP pooled embedding and zero text ids from the pipeline's encode_prompt), VAE latents sampled,
shifted and scaled, flow matching with uniform t (weighting scheme "none") over the
FlowMatchEulerDiscreteScheduler's training schedule, the noisy latents packed into 2x2 patches with their
latent image ids, timestep / 1000, guidance 3.5 where the transformer embeds guidance (Flux.1-dev; none for
schnell), the prediction unpacked and trained against noise - x_0 with plain MSE.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from .base import DENOISER_PART, StepInputs
from .flow_matching import FlowMatchingFamily
from .tiny import TEXT_LENGTH, clip_text_config, seeded, t5_encoder, tiny_tokenizer, tiny_vae


class Flux(FlowMatchingFamily):
    name = "flux"
    title = "Flux.1"
    pipeline_class_names = ("FluxPipeline",)
    objective = "flow matching (noise - x0), uniform t, packed latents, guidance 3.5"
    denoiser_attribute = "transformer"
    lora_prefix = "transformer"
    # the Flux LoRA script's default: both attention streams and both feed-forwards of the MMDiT blocks
    # (the single-stream blocks' to_q/k/v too)
    default_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                       "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                       "ff_context.net.0.proj", "ff_context.net.2")
    text_components = ("text_encoder", "text_encoder_2")
    max_sequence_length = 512
    guidance_scale = 3.5

    def build_tiny(self, folder=None, seed: int = 0):
        # heavy: only when a tiny pipeline is built
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextModel

        tokenizer = tiny_tokenizer()
        with seeded(seed):
            text_encoder = CLIPTextModel(clip_text_config(tokenizer))
            text_encoder_2 = t5_encoder(tokenizer, d_model=32)
            # in_channels: 4 latent channels x a 2x2 patch; guidance embedded as in Flux.1-dev
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                axes_dims_rope=(4, 4, 8))
            vae = tiny_vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                           use_post_quant_conv=False)
        # Flux.1-dev's scheduler config (resolution-dependent shift at sampling time)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                            text_encoder_2=text_encoder_2, tokenizer_2=tiny_tokenizer(TEXT_LENGTH),
                            transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        if folder is not None:
            pipe.save_pretrained(folder)
        return pipe

    def sequence_length(self, pipe) -> int:
        return min(self.max_sequence_length, pipe.tokenizer_2.model_max_length)

    def condition(self, pipe, batch, device) -> Dict[str, object]:
        embeds, pooled, text_ids = pipe.encode_prompt(list(batch["caption"]), device=device,
                                                      max_sequence_length=self.sequence_length(pipe))
        guidance = None
        if self.denoiser(pipe).config.guidance_embeds:
            guidance = torch.full((len(embeds),), self.guidance_scale, device=device)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids,
                "guidance": guidance}

    def prepare(self, pipe, scheduler, batch, generator, device) -> StepInputs:
        inputs = super().prepare(pipe, scheduler, batch, generator, device)
        batch_size, _, height, width = inputs.noisy.shape
        if height % 2 or width % 2:
            pixels = batch["pixel_values"].shape[-1] // width
            raise ValueError(f"{self.name}: {height}x{width} latents cannot be packed in 2x2 patches; use a "
                             f"--resolution divisible by {2 * pixels}")
        # one id (0, row, column) per 2x2 patch of the latents
        inputs.condition["img_ids"] = self.pipeline_class()._prepare_latent_image_ids(
            batch_size, height // 2, width // 2, device, self.denoiser(pipe).dtype)
        return inputs

    def predict(self, models: Dict[str, nn.Module], inputs: StepInputs) -> torch.Tensor:
        pipeline = self.pipeline_class()
        condition = inputs.condition
        batch, channels, height, width = inputs.noisy.shape
        packed = pipeline._pack_latents(inputs.noisy, batch, channels, height, width)
        prediction = models[DENOISER_PART](
            hidden_states=packed, timestep=inputs.timesteps / 1000, guidance=condition["guidance"],
            pooled_projections=condition["pooled_projections"],
            encoder_hidden_states=condition["encoder_hidden_states"], txt_ids=condition["txt_ids"],
            img_ids=condition["img_ids"], return_dict=False)[0]
        # sizes in latent pixels, so no VAE factor
        return pipeline._unpack_latents(prediction, height, width, vae_scale_factor=1)
