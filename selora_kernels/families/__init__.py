"""Model families: which denoiser, text encoders, conditioning and objective a pipeline trains with.

`detect_family(folder_or_pipeline)` reads the pipeline class (model_index.json `_class_name`, or the loaded
pipeline's class) and, where one class serves two families (Stable Diffusion 1.x / 2.x), the component
configs. `get_family(name)` takes a family name ("sd1", "sd2", "pixart_sigma", "sd3", "sdxl", "sana",
"flux") or "auto" with a pipeline. Growth, Fisher and the kernels never see a family: only the trainer and
the fine-tune program do.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

from .base import DENOISER_PART, TEXT_PART, ModelFamily, StepInputs
from .flux import Flux
from .pixart import PixArtSigma
from .sana import Sana
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL
from .stable_diffusion import StableDiffusion1, StableDiffusion2

FAMILIES: Dict[str, ModelFamily] = {family.name: family for family in (
    StableDiffusion1(), StableDiffusion2(), PixArtSigma(), StableDiffusion3(), StableDiffusionXL(), Sana(),
    Flux())}
AUTO = "auto"


def _folder_config_of(folder: Path):
    def config_of(component: str) -> dict:
        for name in ("config.json", "scheduler_config.json"):
            path = folder / component / name
            if path.is_file():
                return json.loads(path.read_text())
        return {}
    return config_of


def _pipeline_config_of(pipe):
    def config_of(component: str) -> dict:
        module = getattr(pipe, component, None)
        return dict(getattr(module, "config", None) or {})
    return config_of


def detect_family(folder_or_pipeline) -> ModelFamily:
    """The family of a local diffusers pipeline folder or of a loaded pipeline."""
    if isinstance(folder_or_pipeline, (str, Path)):
        folder = Path(folder_or_pipeline)
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{folder}: no model_index.json; expected a local diffusers pipeline folder")
        class_name = json.loads(index_path.read_text()).get("_class_name", "")
        config_of = _folder_config_of(folder)
        where = str(folder)
    else:
        class_name = type(folder_or_pipeline).__name__
        config_of = _pipeline_config_of(folder_or_pipeline)
        where = f"a {class_name}"
    for family in FAMILIES.values():
        if family.matches(class_name, config_of):
            return family
    known = sorted({c for family in FAMILIES.values() for c in family.pipeline_class_names})
    raise ValueError(f"{where}: pipeline class {class_name!r} is not a supported model family; supported "
                     f"pipelines: {known} (families {sorted(FAMILIES)})")


def get_family(name: str, folder_or_pipeline=None) -> ModelFamily:
    """The family called `name`, or the detected one for "auto" (None: the tiny SD 1.x pipeline's)."""
    if name in (None, AUTO):
        return FAMILIES["sd1"] if folder_or_pipeline is None else detect_family(folder_or_pipeline)
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected {AUTO!r} or one of {sorted(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "AUTO", "ModelFamily", "StepInputs", "DENOISER_PART", "TEXT_PART", "detect_family",
           "get_family", "StableDiffusion1", "StableDiffusion2", "PixArtSigma", "StableDiffusion3",
           "StableDiffusionXL", "Sana", "Flux"]
