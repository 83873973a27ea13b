"""The flow-matching step shared by the diffusers dreambooth LoRA scripts of SD3, Sana and Flux.

u from compute_density_for_timestep_sampling(weighting_scheme), indices = u x num_train_timesteps into the
FlowMatchEulerDiscreteScheduler's training schedule (its timesteps and sigmas as built from the pipeline's
scheduler config), x_t = (1 - sigma) x_0 + sigma noise, target noise - x_0 (or x_0 with preconditioned
outputs), per-sample weights from compute_loss_weighting_for_sd3.
"""
from __future__ import annotations

import torch

from .base import ModelFamily, StepInputs


class FlowMatchingFamily(ModelFamily):
    """A family trained with the scripts' flow-matching objective; subclasses pick the scheme."""

    weighting_scheme = "none"  # the scripts' default: uniform t, unweighted loss
    logit_mean, logit_std, mode_scale = 0.0, 1.0, 1.29
    precondition_outputs = False  # SD3: the x_0 estimate x_t - sigma v against x_0

    def noise_scheduler(self, pipe):
        from diffusers import FlowMatchEulerDiscreteScheduler  # heavy: imported when a run is set up

        # as the scripts: the folder's scheduler config read as this class (keys it lacks are ignored)
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def add_noise(self, scheduler, latents, generator):
        from diffusers.training_utils import (compute_density_for_timestep_sampling,  # heavy: a run is set up
                                              compute_loss_weighting_for_sd3)

        device, batch = latents.device, latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(device)
        u = compute_density_for_timestep_sampling(self.weighting_scheme, batch, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                  generator=generator)
        indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
        timesteps = scheduler.timesteps[indices].to(device)
        sigmas = scheduler.sigmas[indices].to(device=device, dtype=latents.dtype)
        sigmas = sigmas.reshape(batch, *[1] * (latents.ndim - 1))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        target = latents if self.precondition_outputs else noise - latents
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas)
        return noisy, timesteps, target, (weighting, sigmas)

    def prepare(self, pipe, scheduler, batch, generator, device) -> StepInputs:
        inputs = super().prepare(pipe, scheduler, batch, generator, device)
        inputs.weighting, inputs.condition["sigmas"] = inputs.weighting
        return inputs

    def precondition(self, prediction: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        if self.precondition_outputs:
            prediction = prediction * (-inputs.condition["sigmas"]) + inputs.noisy
        return prediction
