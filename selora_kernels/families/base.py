"""What a model family tells the trainer: which modules the adapters go on, how a batch becomes the denoiser's
input and target, and how the trained adapters leave as a file that family's pipeline loads.

The trainer asks a family, per step:

    inputs = family.prepare(pipe, scheduler, batch, generator, device)   # no grad: latents, noise, conditioning
    prediction = family.predict(models, inputs)                          # adapted modules (under autocast)
    loss = family.loss(prediction, inputs)

`models` maps the adapter method's part names to the (accelerate-prepared) modules: "unet" is the method's
name for the denoiser, a UNet or a transformer alike, and "text_encoder" is present only for families whose
text encoder is adapted. Every family draws its random numbers from the one (seed, step) generator the
trainer hands it, so a resumed run draws what the original would.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..integrations.adapter_io import PEFT_WEIGHT_NAME, atomic_save_safetensors, atomic_write, read_safetensors

DENOISER_PART = "unet"  # the adapter methods' part name for the denoiser, whatever its class
TEXT_PART = "text_encoder"


@dataclass
class StepInputs:
    """One batch ready for the denoiser: everything that needs no gradient, computed once per step (the
    released-script closure and validation reuse it)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    condition: Dict[str, object] = field(default_factory=dict)
    weighting: Optional[torch.Tensor] = None  # per-sample loss weights (flow matching), None: plain MSE

    def __len__(self) -> int:
        return self.noisy.shape[0]


class ModelFamily:
    """Base of every family; subclasses set the class attributes and override what differs."""

    name = "family"
    title = "family"
    pipeline_class_names: Tuple[str, ...] = ()
    objective = ""
    denoiser_attribute = "unet"  # the pipeline attribute holding the denoiser
    lora_prefix = "unet"  # the key prefix the pipeline's load_lora_weights reads for the denoiser
    method_parts: Tuple[str, ...] = (DENOISER_PART,)
    default_targets: object = ("to_q", "to_k", "to_v", "to_out.0")
    # the trainer's memory options (TrainOptions), the same for every family
    memory_option = "--gradient-checkpointing; --base-storage-dtype bf16 / float8_e4m3fn / float8_e5m2"
    text_components: Tuple[str, ...] = ("text_encoder",)
    tiny_resolution = 64

    # ------------------------------------------------------------------ detection and loading
    def matches(self, class_name: str, config_of) -> bool:
        """Whether a pipeline of class `class_name` is this family; config_of(component) -> its config dict."""
        return class_name in self.pipeline_class_names

    def pipeline_class(self):
        import diffusers  # heavy: imported when a pipeline is loaded

        return getattr(diffusers, self.pipeline_class_names[0])

    def load(self, folder):
        pipe = self.pipeline_class().from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def build_tiny(self, folder=None, seed: int = 0):
        """A pipeline of this family with random weights, built from configs (nothing downloaded)."""
        raise NotImplementedError(f"{self.name}: no tiny pipeline")

    def tokenizer(self, pipe):
        """The tokenizer the dataset's input_ids come from."""
        return pipe.tokenizer

    # ------------------------------------------------------------------ training
    def denoiser(self, pipe) -> nn.Module:
        return getattr(pipe, self.denoiser_attribute)

    def adapted_parts(self, pipe, parts: Sequence[str] = None) -> Dict[str, nn.Module]:
        """method part name -> module, in the order the trainer prepares them."""
        available = {DENOISER_PART: self.denoiser(pipe)}
        if TEXT_PART in self.method_parts:
            available[TEXT_PART] = pipe.text_encoder
        return {part: module for part, module in available.items() if parts is None or part in parts}

    def frozen_modules(self, pipe) -> List[nn.Module]:
        """Modules the step runs without adapting them (moved to the device, never trained)."""
        modules = [pipe.vae]
        if TEXT_PART not in self.method_parts:
            modules += [getattr(pipe, name) for name in self.text_components if getattr(pipe, name, None) is not None]
        return modules

    def noise_scheduler(self, pipe):
        from diffusers import DDPMScheduler  # heavy: imported when a run is set up

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def encode_images(self, pipe, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled VAE latents, the posterior sampled from `generator`."""
        vae = pipe.vae
        posterior = vae.encode(pixels.to(dtype=vae.dtype)).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(
            posterior.mean.device)
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return latents * vae.config.scaling_factor

    def add_noise(self, scheduler, latents, generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
        """DDPM: timesteps uniform over the training steps; the target by the scheduler's prediction_type."""
        device = latents.device
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        elif prediction_type == "epsilon":
            target = noise
        else:
            raise ValueError(f"{self.name}: prediction_type {prediction_type!r} is not trained here "
                             f"(epsilon or v_prediction)")
        return noisy, timesteps, target, None

    def condition(self, pipe, batch, device) -> Dict[str, object]:
        """The denoiser's conditioning of a batch, computed without gradients (frozen text encoders)."""
        raise NotImplementedError

    def prepare(self, pipe, scheduler, batch, generator, device) -> StepInputs:
        with torch.no_grad():
            latents = self.encode_images(pipe, batch["pixel_values"].to(device), generator)
            noisy, timesteps, target, weighting = self.add_noise(scheduler, latents, generator)
            condition = self.condition(pipe, batch, device)
        return StepInputs(noisy, timesteps, target, condition, weighting)

    def predict(self, models: Dict[str, nn.Module], inputs: StepInputs) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, prediction: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        if inputs.weighting is None:
            return F.mse_loss(prediction.float(), inputs.target.float(), reduction="mean")
        squared = inputs.weighting.float() * (prediction.float() - inputs.target.float()) ** 2
        return squared.reshape(len(inputs), -1).mean(dim=1).mean()

    # ------------------------------------------------------------------ export
    def export(self, method, directory, weight_name: str = PEFT_WEIGHT_NAME) -> Path:
        """The method's diffusers LoRA file, its denoiser keys renamed to the prefix this pipeline's
        load_lora_weights reads ("unet." -> e.g. "transformer.")."""
        path = method.export(directory, weight_name=weight_name)
        if self.lora_prefix != DENOISER_PART:
            rename_prefix(path, DENOISER_PART, self.lora_prefix)
        return path

    def load_exported(self, pipe, directory, weight_name: str = PEFT_WEIGHT_NAME):
        """Loads an `export` into `pipe` the way this family's pipeline does (load_lora_weights)."""
        pipe.load_lora_weights(str(directory), weight_name=weight_name)
        return pipe

    def describe(self) -> dict:
        targets = self.default_targets if isinstance(self.default_targets, str) else list(self.default_targets)
        return {"family": self.name, "objective": self.objective, "default_targets": targets,
                "parts": list(self.method_parts), "lora_prefix": self.lora_prefix}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class CappedTextLength:
    """For families whose one text encoder (T5, Gemma) has an effectively unbounded model_max_length: the
    prompts are padded to the family's `max_sequence_length`, as its training script does."""

    max_sequence_length: int

    def tokenizer(self, pipe):
        # the dataset pads its (unused here) input_ids to model_max_length
        if pipe.tokenizer.model_max_length > self.max_sequence_length:
            pipe.tokenizer.model_max_length = self.max_sequence_length
        return pipe.tokenizer

    def sequence_length(self, pipe) -> int:
        return min(self.max_sequence_length, pipe.tokenizer.model_max_length)


def rename_prefix(path, old: str, new: str) -> Path:
    """Rewrites a LoRA file so keys (and lora_adapter_metadata entries) under `old.` sit under `new.`."""
    tensors, header = read_safetensors(path, what="LoRA file")
    renamed = {(new + key[len(old):] if key.startswith(old + ".") else key): value for key, value in tensors.items()}
    if "lora_adapter_metadata" in header:
        metadata = json.loads(header["lora_adapter_metadata"])
        metadata = {(new + key[len(old):] if key.startswith(old + ".") else key): value
                    for key, value in metadata.items()}
        header = dict(header, lora_adapter_metadata=json.dumps(metadata, indent=2, sort_keys=True))
    return atomic_save_safetensors(renamed, path, header)


def write_peft_folder(path, directory, component: str) -> Path:
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors) holding the `component.` entries
    of the LoRA file at `path`, for pipelines without a LoRA loader: `PeftModel.from_pretrained(model, dir)`."""
    tensors, header = read_safetensors(path, what="LoRA file")
    prefix = component + "."
    weights = {"base_model.model." + key[len(prefix):]: value for key, value in tensors.items()
               if key.startswith(prefix)}
    metadata = json.loads(header.get("lora_adapter_metadata", "{}"))
    config = {key[len(prefix):]: value for key, value in metadata.items() if key.startswith(prefix)}
    config.update(peft_type="LORA", task_type=None, bias="none", init_lora_weights=True, lora_dropout=0.0,
                  fan_in_fan_out=False, modules_to_save=None)
    directory = Path(directory)
    atomic_save_safetensors(weights, directory / "adapter_model.safetensors", {"format": "pt"})
    atomic_write(directory / "adapter_config.json",
                 lambda tmp: tmp.write_text(json.dumps(config, indent=2, sort_keys=True)))
    return directory
