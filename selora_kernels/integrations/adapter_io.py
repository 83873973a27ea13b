"""SeLoRA adapter files (safetensors), export to the peft/diffusers LoRA format, merging for inference.

Adapter file: tensors `<module>.lora_A` (rank x in), `<module>.lora_B` (out x rank) trimmed to the live rank,
and `<module>.trial_row` (the next row K, so a resumed run expands exactly as the original would). The
header metadata holds the format tag, the SeLoRAConfig and every module's rank, capacity and shape, so a
load can say precisely why a file does not fit a model. Adapter files, exports and the trainer's checkpoint
bookkeeping are written through `atomic_write` (a temp file + os.replace).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import safetensors.torch
from safetensors import safe_open
from torch import nn

from ..config import SeLoRAConfig, canonical_mode
from ..nn.selora_linear import SeLoRALinear, selora_modules
from .targets import set_submodule

FORMAT_TAG = "selora_adapter"
FORMAT_VERSION = "1"
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION,)  # what read_adapter accepts
MODULE_ENTRY_KEYS = ("rank", "capacity", "in_features", "out_features", "r_init", "alpha", "scaling")
PEFT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The options that decide what an adapter computes: a file saved under other values does not fit.
CONFIG_KEYS_THAT_MUST_MATCH = ("r", "lora_alpha", "scaling", "target_modules", "exclude_modules")
# files written before the config took peft's argument names
OLD_CONFIG_KEYS = {"r_init": "r", "alpha": "lora_alpha"}


def config_to_dict(config: SeLoRAConfig) -> dict:
    values = dataclasses.asdict(config)
    values["peft_type"] = str(getattr(values["peft_type"], "value", values["peft_type"]))
    return values


def config_from_dict(values: dict) -> SeLoRAConfig:
    values = {OLD_CONFIG_KEYS.get(k, k): v for k, v in values.items()}
    known = {f.name for f in dataclasses.fields(SeLoRAConfig)} - {"peft_type"}
    return SeLoRAConfig(**{k: v for k, v in values.items() if k in known})


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """Calls `write(tmp)` on a temp path in the folder of `path`, then os.replace(tmp, path): a reader (or a
    crash) sees the old file or the new one, never half of one. The temp file is removed if `write` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path, metadata: Dict[str, str]) -> Path:
    """A safetensors file written whole (atomic_write)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))


def save_adapter(path, model_or_modules, config: Optional[SeLoRAConfig] = None,
                 extra_metadata: Optional[dict] = None) -> Path:
    """Writes every SeLoRA module of `model_or_modules` (names: their qualified `selora_name`) to `path`."""
    modules = selora_modules(model_or_modules)
    if not modules:
        raise ValueError(f"save_adapter({path}): no SeLoRALinear modules found")
    tensors, table = {}, {}
    for name, module in modules.items():
        rank = module.rank
        tensors[f"{name}.lora_A"] = module.lora_A[:rank].clone()
        tensors[f"{name}.lora_B"] = module.lora_B[:, :rank].clone()
        tensors[f"{name}.trial_row"] = module.trial_row.clone()
        table[name] = dict(rank=rank, capacity=module.capacity, in_features=module.in_features,
                           out_features=module.out_features, r_init=module.r_init, alpha=module.alpha,
                           scaling=module.scaling, scale=module.scale)
    metadata = {"format": FORMAT_TAG, "format_version": FORMAT_VERSION, "modules": json.dumps(table),
                "extra": json.dumps(extra_metadata or {})}
    if config is not None:
        metadata["selora_config"] = json.dumps(config_to_dict(config))
    return atomic_save_safetensors(tensors, path, metadata)


def read_safetensors(path, what: str = "adapter file"):
    """(tensors, raw string metadata) of a safetensors file; FileNotFoundError naming `what` if absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}


def read_adapter(path):
    """(tensors, metadata) of an adapter file, metadata values decoded from JSON."""
    path = Path(path)
    tensors, raw = read_safetensors(path)
    if raw.get("format") != FORMAT_TAG:
        raise ValueError(f"{path}: not a SeLoRA adapter file (header format={raw.get('format')!r}, expected "
                         f"{FORMAT_TAG!r}); peft/diffusers LoRA files load with pipe.load_lora_weights")
    version = raw.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        # a newer writer may have changed what the tensors mean: refuse rather than load them wrongly
        raise ValueError(f"{path}: adapter format_version {version!r} is not supported; this version of "
                         f"selora_kernels reads format_version {' or '.join(map(repr, SUPPORTED_FORMAT_VERSIONS))}")
    if "modules" not in raw:
        raise ValueError(f"{path}: header metadata has no 'modules' entry (the module table, JSON); found keys "
                         f"{sorted(raw)}")
    metadata = {"format_version": version, "modules": _header_json(path, raw, "modules", dict),
                "extra": _header_json(path, raw, "extra", dict) if "extra" in raw else {},
                "selora_config": (_header_json(path, raw, "selora_config", dict) if "selora_config" in raw
                                  else None)}
    return tensors, metadata


def _header_json(path, raw: dict, key: str, kind: type):
    """The header entry `key` decoded from JSON; ValueError naming the file and the entry otherwise."""
    try:
        value = json.loads(raw[key])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: header metadata {key!r} is not JSON ({error.msg}, column {error.colno}: "
                         f"{raw[key]!r:.60}); expected a JSON {kind.__name__} as save_adapter writes") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path}: header metadata {key!r} is a JSON {type(value).__name__}, expected a JSON "
                         f"{kind.__name__} as save_adapter writes")
    return value


def _check_config(path, saved: Optional[dict], config: Optional[SeLoRAConfig]) -> None:
    if saved is None or config is None:
        return
    current = config_to_dict(config)
    saved = {OLD_CONFIG_KEYS.get(k, k): v for k, v in saved.items()}
    for key in CONFIG_KEYS_THAT_MUST_MATCH:
        if key in saved and _normalise(saved[key]) != _normalise(current[key]):
            raise ValueError(f"{path}: saved with config {key}={saved[key]!r}, but the current config has "
                             f"{key}={current[key]!r}; use the config the adapter was trained with")


def _normalise(value):
    # files written before the released-script rename say "reference_code"
    return list(value) if isinstance(value, tuple) else canonical_mode(value)


def load_adapter(path, model_or_modules, config: Optional[SeLoRAConfig] = None) -> dict:
    """Loads an adapter file into the SeLoRA modules of a model (ranks and capacities restored).

    Raises ValueError when the file comes from another model (module names or shapes differ), another
    config (r_init, alpha, scaling, targets), or its recorded ranks disagree with its tensors. Returns
    the file's metadata (with "extra" as saved).
    """
    tensors, metadata = read_adapter(path)
    _check_config(path, metadata["selora_config"], config)
    modules = selora_modules(model_or_modules)
    table = metadata["modules"]
    missing, unexpected = sorted(modules.keys() - table.keys()), sorted(table.keys() - modules.keys())
    if missing or unexpected:
        raise ValueError(f"{path}: the adapter was saved from another model or target set: "
                         f"{len(missing)} modules of this model are not in the file (e.g. {missing[:3]}), "
                         f"{len(unexpected)} modules of the file are not in the model (e.g. {unexpected[:3]})")
    for name, module in modules.items():
        entry = table[name]
        absent = [key for key in MODULE_ENTRY_KEYS if not isinstance(entry, dict) or key not in entry]
        absent += [f"{name}.{key}" for key in ("lora_A", "lora_B", "trial_row") if f"{name}.{key}" not in tensors]
        if absent:
            raise ValueError(f"{path}: module {name} lacks {absent} in the file; expected the module table entry "
                             f"keys {list(MODULE_ENTRY_KEYS)} and tensors lora_A, lora_B, trial_row, as "
                             f"save_adapter writes")
        expected = (module.in_features, module.out_features)
        if (entry["in_features"], entry["out_features"]) != expected:
            raise ValueError(f"{path}: {name} was saved with (in, out) = "
                             f"{(entry['in_features'], entry['out_features'])}, this model has {expected}: "
                             f"an adapter of another model")
        for key in ("r_init", "alpha", "scaling"):
            if entry[key] != getattr(module, key):
                raise ValueError(f"{path}: {name} was saved with {key}={entry[key]!r}, the module has "
                                 f"{key}={getattr(module, key)!r}: an adapter of another config")
        lora_a, lora_b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        rank = int(entry["rank"])
        if lora_a.shape != (rank, module.in_features) or lora_b.shape != (module.out_features, rank):
            raise ValueError(f"{path}: {name} records rank {rank} but its tensors are A {tuple(lora_a.shape)}, "
                             f"B {tuple(lora_b.shape)}; expected A ({rank}, {module.in_features}) and "
                             f"B ({module.out_features}, {rank}): the file's ranks disagree with its tensors")
    for name, module in modules.items():
        _load_module(module, tensors, name, table[name])
    return metadata


def _load_module(module: SeLoRALinear, tensors, name: str, entry: dict) -> None:
    rank = int(entry["rank"])
    capacity = max(int(entry["capacity"]), rank)
    dtype, device = module.lora_A.dtype, module.lora_A.device
    lora_a = torch.zeros(capacity, module.in_features, dtype=dtype, device=device)
    lora_b = torch.zeros(module.out_features, capacity, dtype=dtype, device=device)
    lora_a[:rank] = tensors[f"{name}.lora_A"].to(dtype)
    lora_b[:, :rank] = tensors[f"{name}.lora_B"].to(dtype)
    state = {"lora_A": lora_a, "lora_B": lora_b, "live_rank": torch.tensor(rank),
             "trial_row": tensors[f"{name}.trial_row"].to(module.trial_row.dtype)}
    # the module's own state-dict hook reallocates the capacity when it differs
    result = module.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{name}: unexpected adapter keys {result.unexpected_keys}")
    module.scale = float(entry.get("scale", module.scale))


# ---------------------------------------------------------------------------- peft / diffusers export
def _relative_modules(model: nn.Module) -> Dict[str, SeLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SeLoRALinear)}


def peft_state_dict(model: nn.Module, prefix: Optional[str] = None,
                    dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """`[<prefix>.]<path>.lora_A.weight` (r x in) and `.lora_B.weight` (out x r, scale s folded in).

    Without prefix it is what diffusers' `save_lora_weights(unet_lora_layers=...)` expects. dtype: float64
    lets a converter (kohya_export) fold further factors into B before the one rounding to float32."""
    tensors = {}
    for path, module in _relative_modules(model).items():
        path = f"{prefix}.{path}" if prefix else path
        tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"] = module.live_factors(dtype)
    return tensors


def peft_lora_metadata(ranks: Dict[str, int]) -> dict:
    """LoraConfig kwargs for modules (path -> rank) with per-module ranks: the most common rank as `r`, the
    others in rank_pattern. alpha_m = r_m, so peft's scale alpha/r is 1: the method's scale is folded into B."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    return {"r": common, "lora_alpha": common, "target_modules": sorted(ranks),
            "rank_pattern": {p: r for p, r in ranks.items() if r != common},
            "alpha_pattern": {p: r for p, r in ranks.items() if r != common},
            "use_dora": False, "lora_bias": False}


def peft_metadata(model: nn.Module) -> dict:
    """peft_lora_metadata of the SeLoRA modules of `model` at their live ranks."""
    return peft_lora_metadata({path: m.rank for path, m in _relative_modules(model).items()})


def export_peft_lora(save_directory, models: Dict[str, nn.Module],
                     weight_name: str = PEFT_WEIGHT_NAME) -> Path:
    """Writes the adapters of `models` (component prefix -> model, e.g. {"unet": unet, "text_encoder": te})
    as a diffusers LoRA file that `pipe.load_lora_weights(save_directory)` loads with per-module ranks."""
    tensors, metadata = {}, {}
    for prefix, model in models.items():
        if not _relative_modules(model):
            raise ValueError(f"export_peft_lora: {prefix} has no SeLoRALinear modules")
        tensors.update(peft_state_dict(model, prefix))
        metadata.update({f"{prefix}.{key}": value for key, value in peft_metadata(model).items()})
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(metadata, indent=2, sort_keys=True)}
    return atomic_save_safetensors(tensors, Path(save_directory) / weight_name, header)


def merge_selora(model: nn.Module) -> nn.Module:
    """Replaces every SeLoRALinear of `model` by an nn.Linear with W0 + s B A merged (for inference)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SeLoRALinear):
            set_submodule(model, name, module.to_linear())
    return model
