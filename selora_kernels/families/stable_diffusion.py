"""Stable Diffusion 1.x and 2.x: UNet + one CLIP text encoder, both adapted (the paper's setting).

The two share a pipeline class (StableDiffusionPipeline); 2.x is told apart by its v-prediction scheduler or
its UNet's linear projections (2.x-base predicts epsilon but has use_linear_projection). The objective follows
the scheduler's prediction_type either way, as diffusers' train_text_to_image_lora.py does.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..data.tiny_pipeline import UNET_CONFIG, build_tiny_pipeline
from .base import DENOISER_PART, TEXT_PART, ModelFamily, StepInputs


class StableDiffusion1(ModelFamily):
    name = "sd1"
    title = "Stable Diffusion 1.x"
    pipeline_class_names = ("StableDiffusionPipeline",)
    objective = "epsilon MSE (DDPM)"
    method_parts = (DENOISER_PART, TEXT_PART)
    # the paper's layers: UNet to_q/k/v, ff.net.0.proj, time_emb_proj; every CLIP linear
    default_targets = "released_script"

    def matches(self, class_name, config_of) -> bool:
        return class_name in self.pipeline_class_names and not _is_sd2(config_of)

    def load(self, folder):
        from diffusers import StableDiffusionPipeline  # heavy: imported when a pipeline is loaded

        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def build_tiny(self, folder=None, seed: int = 0):
        return build_tiny_pipeline(folder, seed=seed)

    def adapted_parts(self, pipe, parts=None):
        # the text encoder's forward is part of the step whether or not the method adapts it
        return {DENOISER_PART: pipe.unet, TEXT_PART: pipe.text_encoder}

    def condition(self, pipe, batch, device) -> Dict[str, object]:
        return {"input_ids": batch["input_ids"].to(device)}

    def predict(self, models: Dict[str, nn.Module], inputs: StepInputs) -> torch.Tensor:
        hidden = models[TEXT_PART](inputs.condition["input_ids"], return_dict=False)[0]
        return models[DENOISER_PART](inputs.noisy, inputs.timesteps, hidden, return_dict=False)[0]


class StableDiffusion2(StableDiffusion1):
    name = "sd2"
    title = "Stable Diffusion 2.x"
    objective = "v-prediction MSE (scheduler prediction_type; 2.x-base: epsilon)"

    def matches(self, class_name, config_of) -> bool:
        return class_name in self.pipeline_class_names and _is_sd2(config_of)

    def build_tiny(self, folder=None, seed: int = 0):
        """The tiny SD pipeline with SD 2.x's v-prediction scheduler and linear projections in the UNet."""
        from diffusers import DDIMScheduler, UNet2DConditionModel  # heavy: only when a tiny pipeline is built

        pipe = build_tiny_pipeline(None, seed=seed)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            unet = UNet2DConditionModel(**dict(UNET_CONFIG, use_linear_projection=True))
        finally:
            torch.random.set_rng_state(state)
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
        pipe.register_modules(unet=unet, scheduler=scheduler)
        if folder is not None:
            pipe.save_pretrained(folder)
        return pipe


def _is_sd2(config_of) -> bool:
    return (config_of("scheduler").get("prediction_type") == "v_prediction"
            or bool(config_of("unet").get("use_linear_projection")))
