"""Images for evaluation: one per test prompt, 50 sampler steps, guidance 7.5, fixed seeds (the paper's protocol).

Image i of a run with seed s is drawn from its own generator seeded with seed_mix(s, i), so it does not depend on the
batch size or on which other prompts are in the batch. Works with any StableDiffusionPipeline (SD 1.5 from a
local folder, or the tiny test pipeline). Output folder: 00000.png, ... plus metadata.jsonl (file_name, text,
seed) -- the imagefolder layout that evaluation reads back. height/width go to the pipeline as given (None: the
pipeline's default, 512 px for SD 1.5): pass the training resolution to sample at the size the model was tuned on.

Without a `pretrained` folder the base is the tiny pipeline: the one fine-tuning saved in `<run dir>/tiny_pipeline`
(next to the adapter folder `<run dir>/peft_lora` or `best`) when it is there, else one built from configs with
`seed`, which matches the adapter's base only if fine-tuning used that `--seed` (a warning says so).
"""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..data.seeds import seed_mix
from ..data.tiny_pipeline import build_tiny_pipeline

logger = logging.getLogger(__name__)

PAPER_STEPS = 50
TINY_PIPELINE_DIR = "tiny_pipeline"  # run_finetune saves the tiny base pipeline under <run dir>/tiny_pipeline
PAPER_GUIDANCE = 7.5


def generate_images(pipeline, prompts: Sequence[str], seed: int = 0, num_inference_steps: int = PAPER_STEPS,
                    guidance_scale: float = PAPER_GUIDANCE, batch_size: int = 8, height: Optional[int] = None,
                    width: Optional[int] = None, output_dir: Optional[str] = None, progress: bool = True,
                    negative_prompt: Optional[str] = None) -> List:
    """One PIL image per prompt; saved to `output_dir` (with metadata.jsonl) when given."""
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("generate_images: no prompts")
    if batch_size < 1:
        raise ValueError(f"generate_images: batch_size must be >= 1, got {batch_size}")
    device = getattr(pipeline, "device", torch.device("cpu"))
    pipeline.set_progress_bar_config(disable=True)  # one bar over the prompts instead of one per batch
    images = []
    bar = tqdm(total=len(prompts), desc=f"generate (seed {seed})", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        generators = [torch.Generator(device=device).manual_seed(seed_mix(seed, start + i))
                      for i in range(len(batch))]
        with torch.no_grad():
            output = pipeline(batch, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              generator=generators, height=height, width=width,
                              negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
                              output_type="pil")
        images.extend(output.images)
        bar.update(len(batch))
    bar.close()
    if output_dir is not None:
        save_images(images, prompts, output_dir, seed)
    return images


def save_images(images, prompts: Sequence[str], output_dir: str, seed: Optional[int] = None) -> str:
    """Writes images as 00000.png... and metadata.jsonl (file_name, text, seed of each image)."""
    if len(images) != len(prompts):
        raise ValueError(f"save_images: {len(images)} images but {len(prompts)} prompts")
    os.makedirs(output_dir, exist_ok=True)
    rows = []
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        name = f"{index:05d}.png"
        image.save(os.path.join(output_dir, name))
        row = {"file_name": name, "text": prompt}
        if seed is not None:
            row["seed"] = seed_mix(seed, index)
        rows.append(row)
    tmp = os.path.join(output_dir, f".metadata.jsonl.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, os.path.join(output_dir, "metadata.jsonl"))
    return output_dir


def generate_for_seeds(pipeline, prompts: Sequence[str], seeds: Sequence[int], output_root: str,
                       **options) -> List[str]:
    """One folder per seed (`<output_root>/seed_<s>`); returns the folders."""
    folders = []
    for seed in seeds:
        folder = os.path.join(output_root, f"seed_{seed}")
        generate_images(pipeline, prompts, seed=seed, output_dir=folder, **options)
        folders.append(folder)
    return folders


def saved_tiny_pipeline(adapter: Optional[str]) -> Optional[str]:
    """The tiny pipeline fine-tuning saved for the run of `adapter`: `<run dir>/tiny_pipeline` where the adapter
    is `<run dir>/peft_lora` or `<run dir>/best` (also accepted: a tiny_pipeline inside the adapter folder, or
    the adapter given as its .safetensors file). None when there is none."""
    if adapter is None:
        return None
    folder = os.path.abspath(adapter if os.path.isdir(adapter) else os.path.dirname(adapter))
    for candidate in (os.path.join(os.path.dirname(folder), TINY_PIPELINE_DIR), os.path.join(folder, TINY_PIPELINE_DIR)):
        if os.path.isfile(os.path.join(candidate, "model_index.json")):
            return candidate
    return None


def load_pipeline_with_adapter(pretrained: Optional[str] = None, adapter: Optional[str] = None,
                               device: str = "cpu", seed: int = 0, dtype=None):
    """A StableDiffusionPipeline from a local folder with a diffusers-format LoRA (any method's `export`) loaded
    from `adapter` when given. pretrained None: the tiny pipeline saved next to the adapter by fine-tuning
    (`saved_tiny_pipeline`), else the tiny pipeline built from configs with `seed` (with a warning: its random
    weights are the adapter's base only if fine-tuning ran with that seed)."""
    from diffusers import StableDiffusionPipeline  # diffusers: imported when a pipeline is loaded (heavy)

    if pretrained is None:
        pretrained = saved_tiny_pipeline(adapter)
        if pretrained is not None:
            logger.info("base pipeline: the tiny pipeline fine-tuning saved at %s", pretrained)
    if pretrained is None:
        if adapter is not None:
            logger.warning("no %s/ folder next to adapter %s (fine-tuning saves the tiny base pipeline in "
                           "<run dir>/%s): building the tiny pipeline from configs with seed %d, ASSUMING the "
                           "adapter was fine-tuned with --seed %d; with another seed the base weights differ and "
                           "the images are wrong (pass the run's seed, or --pretrained <run dir>/%s)",
                           TINY_PIPELINE_DIR, adapter, TINY_PIPELINE_DIR, seed, seed, TINY_PIPELINE_DIR)
        pipe = build_tiny_pipeline(seed=seed)
    else:
        if not os.path.isfile(os.path.join(pretrained, "model_index.json")):
            raise FileNotFoundError(f"--pretrained {pretrained}: no model_index.json; expected a local diffusers "
                                    f"StableDiffusionPipeline folder (nothing is downloaded)")
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        pipe = StableDiffusionPipeline.from_pretrained(pretrained, safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True,
                                                       **kwargs)
    if adapter is not None:
        if not os.path.exists(adapter):
            raise FileNotFoundError(f"adapter {adapter!r} does not exist (expected a folder holding "
                                    f"pytorch_lora_weights.safetensors, as a method's export() writes)")
        pipe.load_lora_weights(adapter)
    return pipe.to(device)
