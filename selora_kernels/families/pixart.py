"""PixArt-Sigma: a DiT (PixArtTransformer2DModel) conditioned on T5 hidden states with their attention mask.

As the PixArt-Sigma LoRA training: T5 frozen (embeddings from the pipeline's encode_prompt), DDPM noise,
the target by the scheduler's prediction_type (epsilon for the released checkpoints), added_cond_kwargs
{"resolution": None, "aspect_ratio": None} (Sigma has no micro-conditions), and the learned-variance half
of the output (out_channels = 2 x latent channels) dropped before the MSE, as the pipeline drops it.
PixArtSigmaPipeline has no load_lora_weights: the export is also written as a peft adapter folder that
`PeftModel.from_pretrained(pipe.transformer, folder)` loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from torch import nn

from .base import DENOISER_PART, CappedTextLength, ModelFamily, StepInputs, write_peft_folder
from .tiny import TEXT_LENGTH, seeded, t5_encoder, tiny_tokenizer, tiny_vae

PEFT_FOLDER = "peft_transformer"  # inside an export folder


class PixArtSigma(CappedTextLength, ModelFamily):
    name = "pixart_sigma"
    title = "PixArt-Sigma"
    pipeline_class_names = ("PixArtSigmaPipeline",)
    objective = "epsilon MSE (DDPM), learned-sigma half dropped"
    denoiser_attribute = "transformer"
    lora_prefix = "transformer"
    default_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    max_sequence_length = 300  # PixArt-Sigma's T5 length

    def build_tiny(self, folder=None, seed: int = 0):
        from diffusers import DDPMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel  # heavy: tiny builds only

        tokenizer = tiny_tokenizer(TEXT_LENGTH)
        with seeded(seed):
            text_encoder = t5_encoder(tokenizer, d_model=32)
            transformer = PixArtTransformer2DModel(
                sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
                caption_channels=32, in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6)
            vae = tiny_vae()
        scheduler = DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                  num_train_timesteps=1000, prediction_type="epsilon")
        pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                   transformer=transformer, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        if folder is not None:
            pipe.save_pretrained(folder)
        return pipe

    def condition(self, pipe, batch, device) -> Dict[str, object]:
        embeds, mask, _, _ = pipe.encode_prompt(list(batch["caption"]), do_classifier_free_guidance=False,
                                                device=device, clean_caption=False,
                                                max_sequence_length=self.sequence_length(pipe))
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    def predict(self, models: Dict[str, nn.Module], inputs: StepInputs) -> torch.Tensor:
        transformer = models[DENOISER_PART]
        prediction = transformer(inputs.noisy, encoder_hidden_states=inputs.condition["encoder_hidden_states"],
                                 encoder_attention_mask=inputs.condition["encoder_attention_mask"],
                                 timestep=inputs.timesteps,
                                 added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                 return_dict=False)[0]
        if prediction.shape[1] == 2 * inputs.noisy.shape[1]:  # learned sigma: the mean half is trained
            prediction = prediction.chunk(2, dim=1)[0]
        return prediction

    def export(self, method, directory, weight_name=None):
        kwargs = {} if weight_name is None else {"weight_name": weight_name}
        path = super().export(method, directory, **kwargs)
        write_peft_folder(path, path.parent / PEFT_FOLDER, self.lora_prefix)
        return path

    def load_exported(self, pipe, directory, weight_name=None):
        from peft import PeftModel  # optional: only to load an export

        # peft injects into pipe.transformer in place; the wrapper itself is not needed
        PeftModel.from_pretrained(pipe.transformer, str(Path(directory) / PEFT_FOLDER))
        return pipe
