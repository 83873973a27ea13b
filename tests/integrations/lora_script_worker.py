"""diffusers' examples/text_to_image/train_text_to_image_lora.py, in structure, with the README's SeLoRA diff.

Not a copy: the same client code paths in the same order (Accelerator with gradient accumulation and a
project folder, `unet.add_adapter(<config>)`, an optimizer class over `filter(requires_grad)` with the
script's betas / weight decay / epsilon, the save hook on `get_peft_model_state_dict` + `save_lora_weights`,
the load hook on `lora_state_dict` + `convert_unet_state_dict_to_peft` + `set_peft_model_state_dict`,
`accelerator.prepare`, `save_state` every --checkpointing-steps on the main process, `load_state` on
resume, the final `convert_state_dict_to_diffusers(get_peft_model_state_dict(...))` +
`save_lora_weights`, then `pipeline.load_lora_weights`). The lines marked "SeLoRA" are the README's diff.
Randomness is drawn per sample from (step, sample index), so a run on one process and on two (each its
half of the global batch) see the same noise, and a resumed run the same as the uninterrupted one.

    python lora_script_worker.py --pretrained P --output-dir D --max-steps N [--resume latest] [--stop-at K]
Writes D/final-<process>.pt: ranks, capacities, A, B, trial rows, optimizer state, decisions, and (main
process) the relative difference of the reloaded LoRA pipeline's UNet prediction to the trained UNet's.
"""
import argparse
import os

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from selora_kernels import SeLoRAAdamW, SeLoRAConfig, attach_expansion  # SeLoRA: added line
from selora_kernels.data.seeds import seed_mix
from selora_kernels.nn.selora_linear import selora_modules

DATASET_SIZE, RESOLUTION = 16, 64


class Items(torch.utils.data.Dataset):
    """Deterministic images and captions; each item knows its index (its randomness is keyed by it)."""

    def __init__(self, tokenizer):
        generator = torch.Generator().manual_seed(5)
        self.pixels = torch.rand(DATASET_SIZE, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1
        captions = [f"a chest x-ray {'with' if i % 2 else 'without'} effusion {i}" for i in range(DATASET_SIZE)]
        self.ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids

    def __len__(self):
        return DATASET_SIZE

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "input_ids": self.ids[i], "index": i}


def per_sample(step, indices, shape_fn):
    return torch.stack([shape_fn(torch.Generator().manual_seed(seed_mix(step, int(i)))) for i in indices])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--capacity", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=1.0)
    parser.add_argument("--interval", type=int, default=1)
    parser.add_argument("--train-batch-size", type=int, default=2)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--stop-at", type=int, default=None, help="exit after this step (a crash)")
    parser.add_argument("--checkpointing-steps", type=int, default=3)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=True,
                              project_config=ProjectConfiguration(project_dir=args.output_dir))
    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained, safety_checker=None)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    tokenizer, text_encoder, vae = pipe.tokenizer, pipe.text_encoder, pipe.vae
    unet = UNet2DConditionModel.from_pretrained(args.pretrained, subfolder="unet")
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)

    unet_lora_config = SeLoRAConfig(  # SeLoRA: changed line (LoraConfig -> SeLoRAConfig)
        r=args.rank,
        lora_alpha=args.rank,
        init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        capacity=args.capacity, threshold=args.threshold, interval=args.interval,  # small run: grow quickly
    )
    torch.manual_seed(0)  # the script's set_seed: identical adapters on every process
    unet.add_adapter(unet_lora_config)
    lora_layers = filter(lambda p: p.requires_grad, unet.parameters())

    optimizer_cls = SeLoRAAdamW  # SeLoRA: changed line (torch.optim.AdamW -> SeLoRAAdamW)
    optimizer = optimizer_cls(lora_layers, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    train_dataloader = torch.utils.data.DataLoader(Items(tokenizer), shuffle=False,
                                                   batch_size=args.train_batch_size)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)

    def unwrap_model(model):
        return accelerator.unwrap_model(model)

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            unet_lora_layers_to_save = None
            for model in models:
                if isinstance(model, type(unwrap_model(unet))):
                    unet_lora_layers_to_save = get_peft_model_state_dict(model)
                else:
                    raise ValueError(f"Unexpected save model: {model.__class__}")
                weights.pop()
            StableDiffusionPipeline.save_lora_weights(save_directory=output_dir,
                                                      unet_lora_layers=unet_lora_layers_to_save,
                                                      safe_serialization=True)

    def load_model_hook(models, input_dir):
        unet_ = None
        while len(models) > 0:
            model = models.pop()
            if isinstance(model, type(unwrap_model(unet))):
                unet_ = model
            else:
                raise ValueError(f"unexpected save model: {model.__class__}")
        lora_state_dict, network_alphas = StableDiffusionPipeline.lora_state_dict(input_dir)
        unet_state_dict = {f"{k.replace('unet.', '')}": v for k, v in lora_state_dict.items() if k.startswith("unet.")}
        unet_state_dict = convert_unet_state_dict_to_peft(unet_state_dict)
        incompatible_keys = set_peft_model_state_dict(unet_, unet_state_dict, adapter_name="default")
        unexpected = getattr(incompatible_keys, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"unexpected keys {unexpected}")

    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                          lr_scheduler)
    attachment = attach_expansion(optimizer)  # SeLoRA: added line
    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    global_step, first_epoch, resume_batches = 0, 0, 0
    updates_per_epoch = len(train_dataloader) // args.gradient_accumulation_steps
    if args.resume:
        dirs = sorted((d for d in os.listdir(args.output_dir) if d.startswith("checkpoint")),
                      key=lambda d: int(d.split("-")[1]))
        path = dirs[-1] if args.resume == "latest" else args.resume
        accelerator.load_state(os.path.join(args.output_dir, path))
        global_step = int(path.split("-")[1])
        first_epoch = global_step // updates_per_epoch
        resume_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    num_epochs = -(-args.max_steps // updates_per_epoch)
    for epoch in range(first_epoch, num_epochs):
        unet.train()
        for step, batch in enumerate(train_dataloader):
            if epoch == first_epoch and step < resume_batches:
                continue
            with accelerator.accumulate(unet):
                key = global_step * 1000 + step
                posterior = vae.encode(batch["pixel_values"]).latent_dist
                eps = per_sample(key, batch["index"], lambda g: torch.randn(posterior.mean.shape[1:], generator=g))
                latents = (posterior.mean + posterior.std * eps) * vae.config.scaling_factor
                noise = per_sample(key + 1, batch["index"], lambda g: torch.randn(latents.shape[1:], generator=g))
                timesteps = per_sample(key + 2, batch["index"], lambda g: torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (), generator=g)).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_([p for p in unet.parameters() if p.requires_grad], 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                global_step += 1
                if global_step % args.checkpointing_steps == 0 and accelerator.is_main_process:
                    accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{global_step}"))
                if args.stop_at is not None and global_step >= args.stop_at:
                    accelerator.wait_for_everyone()
                    return
            if global_step >= args.max_steps:
                break

    accelerator.wait_for_everyone()
    trained = unwrap_model(unet)
    inner = optimizer.optimizer
    modules = selora_modules(trained)
    state = {name: {"rank": m.rank, "capacity": m.capacity, "A": m.lora_A.detach().clone(),
                    "B": m.lora_B.detach().clone(), "trial": m.trial_row.clone(),
                    "adam": {k: v.clone() for p in (m.lora_A, m.lora_B) for k, v in inner.state[p].items()}}
             for name, m in modules.items()}
    state["decisions"] = [tuple(d) for d in attachment.controller.history]
    if accelerator.is_main_process:
        unet_lora_state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(trained))
        StableDiffusionPipeline.save_lora_weights(save_directory=args.output_dir,
                                                  unet_lora_layers=unet_lora_state_dict, safe_serialization=True)
        pipeline = StableDiffusionPipeline.from_pretrained(args.pretrained, safety_checker=None)
        pipeline.load_lora_weights(args.output_dir)
        generator = torch.Generator().manual_seed(9)
        sample = torch.randn(2, 4, 8, 8, generator=generator)
        hidden = torch.randn(2, 77, text_encoder.config.hidden_size, generator=generator)
        with torch.no_grad():
            expected = trained(sample, torch.tensor([10, 500]), hidden).sample
            loaded = pipeline.unet(sample, torch.tensor([10, 500]), hidden).sample
        state["lora_relative_difference"] = float((loaded - expected).norm() / expected.norm())
    torch.save(state, os.path.join(args.output_dir, f"final-{accelerator.process_index}.pt"))


if __name__ == "__main__":
    main()
