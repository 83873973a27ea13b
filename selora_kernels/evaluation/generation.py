"""Images for evaluation: one per test prompt, 50 sampler steps, guidance 7.5, fixed seeds (the paper's protocol).

Image i of a run with seed s is drawn from its own generator seeded with seed_mix(s, i), so it does not depend on the
batch size or on which other prompts are in the batch. Works with any StableDiffusionPipeline (SD 1.5 from a
local folder, or the tiny test pipeline). Output folder: 00000.png, ... plus metadata.jsonl (file_name, text,
seed) -- the imagefolder layout that evaluation reads back. height/width go to the pipeline as given (None: the
pipeline's default, 512 px for SD 1.5): pass the training resolution to sample at the size the model was tuned on.

Without a `pretrained` folder the base is the tiny pipeline: the one fine-tuning saved in `<run dir>/tiny_pipeline`
(next to the adapter folder `<run dir>/peft_lora` or `best`) when it is there, else one built from configs with
`seed`, which matches the adapter's base only if fine-tuning used that `--seed` (a warning says so). The adapter
is a diffusers LoRA (folder or file) or a SeLoRA adapter file, converted to the diffusers layout on load.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..data.seeds import seed_mix
from ..data.tiny_pipeline import build_tiny_pipeline
from ..integrations.adapter_io import (FORMAT_TAG, PEFT_WEIGHT_NAME, atomic_save_safetensors, peft_lora_metadata,
                                       read_adapter)

logger = logging.getLogger(__name__)

PAPER_STEPS = 50
TINY_PIPELINE_DIR = "tiny_pipeline"  # run_finetune saves the tiny base pipeline under <run dir>/tiny_pipeline
PAPER_GUIDANCE = 7.5
PIPELINE_PARTS = ("unet", "text_encoder")  # the prefixes the methods give a pipeline's adapted modules


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


ADAPTER_EXPECTED = (f"a folder holding {PEFT_WEIGHT_NAME} as a method's export() writes (<run dir>/peft_lora or "
                    f"<run dir>/best), that file itself, or a SeLoRA adapter file (<run dir>/adapter.safetensors)")


def _exports_near(path: str) -> List[str]:
    """Folders next to (or under) `path` that hold a diffusers LoRA export: what to pass instead."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return [candidate for candidate in (folder, os.path.join(folder, "peft_lora"), os.path.join(folder, "best"))
            if os.path.isfile(os.path.join(candidate, PEFT_WEIGHT_NAME))]


def adapter_kind(adapter: str) -> str:
    """"selora" for a SeLoRA adapter file (converted on load), "diffusers" for a diffusers LoRA folder or file.
    Anything else raises FileNotFoundError / ValueError saying what to pass instead."""
    if not os.path.exists(adapter):
        raise FileNotFoundError(f"adapter {adapter!r} does not exist; expected {ADAPTER_EXPECTED}")
    if os.path.isdir(adapter) or not adapter.endswith(".safetensors"):
        return "diffusers"  # a pickled diffusers LoRA: diffusers reads it
    try:
        with safe_open(adapter, framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"adapter {adapter}: not a readable safetensors file ({error}); expected "
                         f"{ADAPTER_EXPECTED}") from None
    if header.get("format") == FORMAT_TAG:
        return "selora"
    if "adapter_method" in header and "lora_adapter_metadata" not in header:
        # a baseline's save(): raw training tensors whose layout and scale only the method knows
        near = _exports_near(adapter)
        raise ValueError(f"adapter {adapter} is the {header['adapter_method']} method's training file (for "
                         f"resuming), not a diffusers LoRA; pass "
                         + (near[0] if near else f"the folder its export() wrote ({ADAPTER_EXPECTED})"))
    return "diffusers"


def selora_file_as_diffusers(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The tensors and header of the diffusers LoRA file that export_peft_lora would write for the SeLoRA adapter
    file `path` (`<part>.<path>.lora_A/B.weight`, the scale folded into B, per-module ranks in the header)."""
    tensors, metadata = read_adapter(path)
    converted, ranks = {}, {}
    for name, entry in metadata["modules"].items():
        part, _, module_path = name.partition(".")
        if part not in PIPELINE_PARTS or not module_path:
            raise ValueError(f"{path}: module {name!r} is not in a Stable Diffusion pipeline part "
                             f"{PIPELINE_PARTS}; the adapter was saved from another model")
        rank = int(entry["rank"])
        converted[f"{name}.lora_A.weight"] = tensors[f"{name}.lora_A"][:rank].float()
        converted[f"{name}.lora_B.weight"] = (tensors[f"{name}.lora_B"][:, :rank].double()
                                              * float(entry["scale"])).float()
        ranks.setdefault(part, {})[module_path] = rank
    header = {f"{part}.{key}": value for part, part_ranks in ranks.items()
              for key, value in peft_lora_metadata(part_ranks).items()}
    return converted, {"format": "pt", "lora_adapter_metadata": json.dumps(header, indent=2, sort_keys=True)}


def load_adapter_into_pipeline(pipe, adapter: str) -> None:
    """Loads `adapter` (see adapter_kind) into `pipe` with diffusers' load_lora_weights."""
    kind = adapter_kind(adapter)
    try:
        if kind == "selora":
            tensors, header = selora_file_as_diffusers(adapter)
            with tempfile.TemporaryDirectory() as folder:  # diffusers reads per-module ranks from a file header
                atomic_save_safetensors(tensors, os.path.join(folder, PEFT_WEIGHT_NAME), header)
                pipe.load_lora_weights(folder, weight_name=PEFT_WEIGHT_NAME)
        elif os.path.isfile(os.path.join(adapter, PEFT_WEIGHT_NAME)):
            # named: best/ also holds the training file adapter.safetensors
            pipe.load_lora_weights(adapter, weight_name=PEFT_WEIGHT_NAME)
        else:
            pipe.load_lora_weights(adapter)
    except (OSError, ValueError) as error:  # diffusers: "Invalid LoRA checkpoint", "no file named ..."
        near = [folder for folder in _exports_near(adapter) if os.path.abspath(folder) != os.path.abspath(adapter)]
        kind = FileNotFoundError if isinstance(error, OSError) else ValueError  # what the programs report
        raise kind(f"adapter {adapter}: {error}; " + (f"pass {near[0]}" if near else f"expected {ADAPTER_EXPECTED}")) \
            from error


def load_pipeline_with_adapter(pretrained: Optional[str] = None, adapter: Optional[str] = None,
                               device: str = "cpu", seed: int = 0, dtype=None):
    """A StableDiffusionPipeline from a local folder with an adapter loaded when given: a diffusers-format LoRA
    (any method's `export`) or a SeLoRA adapter file (see adapter_kind). pretrained None: the tiny pipeline saved
    next to the adapter by fine-tuning (`saved_tiny_pipeline`), else the tiny pipeline built from configs with
    `seed` (with a warning: its random weights are the adapter's base only if fine-tuning ran with that seed)."""
    from diffusers import StableDiffusionPipeline  # diffusers: imported when a pipeline is loaded (heavy)

    if adapter is not None:
        adapter_kind(adapter)  # a wrong adapter path fails before the pipeline is built
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
        load_adapter_into_pipeline(pipe, adapter)
    return pipe.to(device)
