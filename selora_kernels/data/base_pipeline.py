"""A tiny base pipeline that has learned something: the tiny pipeline pre-trained on the generic domain.

    folder = ensure_base_pipeline("runs/base_cache")      # built once (a few minutes on 2 CPU cores), then reused

Recipe (BaseRecipe): the tiny pipeline's configs with random weights (seeded), then
1. the VAE trained as a deterministic autoencoder on random 32-px crops of the generic images (MSE plus a
   weighted MSE of the chroma, so grey stays grey), its latent scaling factor set to 1 / std of the latents
   it gives over whole images (as Stable Diffusion's 0.18215 was chosen);
2. the UNet and the text encoder trained together on v-prediction over the VAE latents (zero-terminal-SNR
   schedule, BASE_SCHEDULE), with 10 % of the captions replaced by the empty prompt so classifier-free guidance
   has an unconditional model to work with.

The cache folder is `<cache dir>/base-<hash>`, the hash over the recipe, the model configs, the tokenizer words,
a digest of the generated data and BASE_CODE_VERSION: any change gives a new folder. A build is written to a
temporary folder and renamed into place, so a folder under the final name is always complete.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .base_domain import BASE_DOMAIN_WORDS, generic_records
from .records import preprocess_image
from .tiny_pipeline import (TEXT_ENCODER_CONFIG, TINY_RESOLUTION, TOKENIZER_WORDS, UNET_CONFIG, VAE_CONFIG,
                            build_tiny_pipeline)

# 2 groups: with one channel per group (the test pipeline's 8), GroupNorm removes each channel's mean, i.e. the
# colour and brightness of the image, and the autoencoder learned them far more slowly.
# 3 levels (16x16 latents at 64 px): the test pipeline's 4 levels (8x8 latents) learned no more than an 8x8
# thumbnail in the pre-training budget (phantoms decoded blurred and tinted, 18 dB PSNR); this one gives ~27 dB.
BASE_VAE_CONFIG = {**VAE_CONFIG, "block_out_channels": (8, 16, 16), "down_block_types": ("DownEncoderBlock2D",) * 3,
                   "up_block_types": ("UpDecoderBlock2D",) * 3, "norm_num_groups": 2}
# For 16x16 latents: a narrow 16x16 level (no attention) around the test UNet's two levels, which then work at
# 8x8 and 4x4 (cross-attention at 8x8), so a step costs about 15 % more than the test UNet's on 8x8 latents.
# Attention at 16x16 instead doubled the step time.
BASE_UNET_CONFIG = {**UNET_CONFIG, "sample_size": 16, "block_out_channels": (16, 32, 64),
                    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")}

# v-prediction on a zero-terminal-SNR schedule, sampled from t = 999 ("trailing"). With Stable Diffusion 1's
# schedule (epsilon, a little signal left at the last step) the samples' overall brightness and colour followed
# the initial noise's low frequencies, which fine-tuning could not override: phantoms came out tinted and never
# black. The saved scheduler config carries this to fine-tuning (the trainer's target follows prediction_type)
# and to sampling.
BASE_SCHEDULE = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")

# bump when the training code changes what a recipe produces (the data digest covers the data generator)
BASE_CODE_VERSION = 3
BASE_WORDS = tuple(TOKENIZER_WORDS) + BASE_DOMAIN_WORDS
META_FILE = "base_recipe.json"


@dataclass(frozen=True)
class BaseRecipe:
    seed: int = 0
    image_count: int = 512
    resolution: int = TINY_RESOLUTION
    vae_steps: int = 2400
    vae_batch_size: int = 16
    vae_lr: float = 4e-3
    # random crops (side in pixels, on the latent grid; 0: whole images): a 32-px crop step costs a quarter of a
    # 64-px one, and the convolutional autoencoder learns the same local reconstruction from it
    vae_crop: int = 32
    # weight of the chroma term (each pixel's RGB minus its mean): grey has to decode grey, not tinted
    vae_chroma_weight: float = 2.0
    unet_steps: int = 1100
    unet_batch_size: int = 32
    unet_lr: float = 1e-3
    warmup_steps: int = 50
    caption_dropout: float = 0.1
    # fixed: the thread count changes float summation order, hence the weights. 1: these tensors are too small
    # to share, and on 2 busy cores a 2-thread step took 1.7x as long as a 1-thread one (min of 10, measured)
    threads: int = 1


def data_digest(recipe: BaseRecipe) -> str:
    """sha256 of the generated training set (pixels and captions)."""
    digest = hashlib.sha256()
    for record in generic_records(recipe.image_count, recipe.resolution, recipe.seed):
        digest.update(record.image.tobytes())
        digest.update(record.caption.encode())
    return digest.hexdigest()


def recipe_key(recipe: BaseRecipe) -> Dict[str, object]:
    """Everything that decides the base's weights."""
    return {"recipe": asdict(recipe), "code_version": BASE_CODE_VERSION, "vae": BASE_VAE_CONFIG,
            "schedule": BASE_SCHEDULE, "unet": BASE_UNET_CONFIG, "text_encoder": TEXT_ENCODER_CONFIG,
            "words": list(BASE_WORDS), "data": data_digest(recipe), "torch": torch.__version__.split("+")[0]}


def recipe_hash(recipe: BaseRecipe) -> str:
    text = json.dumps(recipe_key(recipe), sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0 (multiplier of the learning rate)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _peak_rss_mb() -> float:
    """The process's peak resident set so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True)


def pretrain_base(recipe: BaseRecipe = BaseRecipe(), progress: bool = True):
    """(pipeline, stats): the tiny pipeline pre-trained by `recipe`; deterministic for a recipe."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel  # heavy: only when pre-training

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(recipe.seed)
            pipe = build_tiny_pipeline(seed=recipe.seed, words=BASE_WORDS, vae_config=BASE_VAE_CONFIG)
            torch.manual_seed(recipe.seed)  # the test pipeline's builder takes no UNet config: swap in the base's
            pipe.register_modules(unet=UNet2DConditionModel(**BASE_UNET_CONFIG),
                                  scheduler=DDIMScheduler.from_config(pipe.scheduler.config, **BASE_SCHEDULE))
            records = generic_records(recipe.image_count, recipe.resolution, recipe.seed)
            pixels = torch.stack([preprocess_image(r.image, recipe.resolution) for r in records])
            gen = torch.Generator().manual_seed(recipe.seed)
            vae_loss = _train_vae(pipe.vae, pixels, recipe, gen, progress)
            latents = _latents(pipe.vae, pixels)
            tokenizer = pipe.tokenizer
            ids = tokenizer([r.caption for r in records], padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
            empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                              return_tensors="pt").input_ids
            unet_loss = _train_denoiser(pipe, latents, ids, empty, recipe, gen,
                                        DDPMScheduler.from_config(pipe.scheduler.config), progress)
    finally:
        torch.set_num_threads(threads)
    for model in (pipe.vae, pipe.unet, pipe.text_encoder):
        model.eval().requires_grad_(False)
    stats = {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": _peak_rss_mb(),
             "vae_final_loss": vae_loss, "denoiser_final_loss": unet_loss,
             "scaling_factor": float(pipe.vae.config.scaling_factor)}
    return pipe, stats


def _train_vae(vae, pixels: torch.Tensor, recipe: BaseRecipe, gen: torch.Generator, progress: bool) -> float:
    vae.train().requires_grad_(True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=recipe.vae_lr)
    bar, recent = _bar(recipe.vae_steps, "pre-train base: VAE", progress), []
    for step in range(recipe.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.vae_lr * _schedule(step, recipe.vae_steps, recipe.warmup_steps)
        batch = _crop(pixels[torch.randint(len(pixels), (recipe.vae_batch_size,), generator=gen)], recipe.vae_crop,
                      gen)
        # a deterministic autoencoder in AutoencoderKL form: decoding noisy samples slowed learning several
        # fold in this step budget; the variance head is pinned to ~0 afterwards (_make_deterministic)
        reconstruction = vae.decode(vae.encode(batch).latent_dist.mean).sample
        loss = F.mse_loss(reconstruction, batch) + recipe.vae_chroma_weight * F.mse_loss(
            _chroma(reconstruction), _chroma(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [float(loss.detach())])[-20:]
        bar.update(1)
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
    bar.close()
    vae.eval().requires_grad_(False)
    _make_deterministic(vae)
    return round(sum(recent) / max(1, len(recent)), 5)


def _crop(batch: torch.Tensor, side: int, gen: torch.Generator, grid: int = 8) -> torch.Tensor:
    """One random `side` x `side` window of the batch, its corner on the `grid` (the VAE's downsampling), so crops
    see the same alignment as whole images; side 0 or the full size: the batch itself."""
    size = batch.shape[-1]
    if not side or side >= size:
        return batch
    top, left = (int(v) * grid for v in torch.randint((size - side) // grid + 1, (2,), generator=gen))
    return batch[..., top:top + side, left:left + side]


def _chroma(pixels: torch.Tensor) -> torch.Tensor:
    return pixels - pixels.mean(dim=1, keepdim=True)


@torch.no_grad()
def _make_deterministic(vae) -> None:
    """Log-variance channels of the posterior moments -> the clamp minimum (-30): std ~ 3e-7, so the trainer's
    posterior samples are the means the denoiser was pre-trained on. The moments come out of quant_conv (a 1x1
    conv after the encoder) when the VAE has one."""
    conv = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder.conv_out
    half = conv.out_channels // 2
    conv.weight[half:] = 0
    conv.bias[half:] = -30.0


@torch.no_grad()
def _latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior means of every image, scaled to unit std (the scale is stored in the VAE config)."""
    means = torch.cat([vae.encode(pixels[i:i + 64]).latent_dist.mean for i in range(0, len(pixels), 64)])
    scale = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scale)
    return means * scale


def _train_denoiser(pipe, latents, ids, empty, recipe: BaseRecipe, gen, scheduler, progress: bool) -> float:
    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=1e-4)
    bar, recent = _bar(recipe.unet_steps, "pre-train base: UNet + text encoder", progress), []
    for step in range(recipe.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.unet_lr * _schedule(step, recipe.unet_steps, recipe.warmup_steps)
        index = torch.randint(len(latents), (recipe.unet_batch_size,), generator=gen)
        clean, tokens = latents[index], ids[index].clone()
        tokens[torch.rand(len(index), generator=gen) < recipe.caption_dropout] = empty[0]
        noise = torch.randn(clean.shape, generator=gen)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=gen)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        hidden = text_encoder(tokens, return_dict=False)[0]
        target = scheduler.get_velocity(clean, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, hidden, return_dict=False)[0], target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [float(loss.detach())])[-50:]
        bar.update(1)
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
    bar.close()
    return round(sum(recent) / max(1, len(recent)), 5)


def cached_base_folder(cache_dir, recipe: BaseRecipe = BaseRecipe()) -> Path:
    return Path(cache_dir) / f"base-{recipe_hash(recipe)}"


def is_complete(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() and (folder / META_FILE).is_file()


def ensure_base_pipeline(cache_dir, recipe: BaseRecipe = BaseRecipe(), progress: bool = True,
                         log=print) -> Tuple[Path, Dict[str, object]]:
    """(folder of the pre-trained base pipeline for `recipe`, its recipe/stats record); built when missing."""
    final = cached_base_folder(cache_dir, recipe)
    if is_complete(final):
        return final, json.loads((final / META_FILE).read_text())
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # not ours (a build never leaves an incomplete folder under the final name)
        shutil.rmtree(final)
    log(f"pre-training the tiny base pipeline (once; cached in {final})")
    temporary = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        pipe, stats = pretrain_base(recipe, progress=progress)
        pipe.save_pretrained(temporary)
        meta = {"hash": final.name.split("-", 1)[1], **recipe_key(recipe), "stats": stats}
        (temporary / META_FILE).write_text(json.dumps(meta, indent=2, default=list))
        try:
            os.rename(temporary, final)
        except OSError:
            if not is_complete(final):  # another process finished the same build first: keep its folder
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return final, json.loads((final / META_FILE).read_text())


def load_base_pipeline(folder, device: str = "cpu"):
    from diffusers import StableDiffusionPipeline  # heavy: imported when a base is loaded

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def default_recipe(overrides: Optional[Dict[str, object]] = None) -> BaseRecipe:
    return BaseRecipe(**(overrides or {}))
