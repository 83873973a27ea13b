"""The one interface of an adapter method (SeLoRA, LoRA, DyLoRA, AdaLoRA), as the trainer drives it:

    method.inject({"unet": unet, "text_encoder": text_encoder})  # adapts the targeted linears, freezes the rest
    optimizer = method.make_optimizer(lr)                         # AdamW(weight_decay=0) over the adapters
    method.attach(optimizer, grad_scaler=None)                    # SeLoRA's controller, AdaLoRA's step hook
    per step:
        method.before_forward(step)                               # DyLoRA draws its rank here
        loss = diffusion_loss + method.extra_loss()               # AdaLoRA's orthogonal regulariser (else None)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        method.after_step(step, closure)                          # SeLoRA's expansion test; DyLoRA back to full rank
    method.ranks()  method.parameter_report()                     # logs: per-module ranks, trainable counts/%
    method.save(file) / method.load(file)                         # adapter tensors + method state (resume)
    method.export(directory)                                      # diffusers LoRA file: pipe.load_lora_weights
    method.state_dict() / load_state_dict() / describe()          # resume
    method.delta_weights()                                        # the weight update each module adds

Target layers come from integrations.targets.resolve_target_names (target_modules and exclude_modules), so
every method adapts exactly the same nn.Linear modules.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..config import SeLoRAConfig
from ..integrations.adapter_io import PEFT_WEIGHT_NAME, atomic_save_safetensors, peft_lora_metadata, read_safetensors
from ..integrations.targets import resolve_target_names

PARTS = ("unet", "text_encoder")


def part_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


class AdapterMethod:
    """Base of every adapter method; subclasses implement `_inject_parts`, `_export_part` and `ranks`, and
    override the hooks they use."""

    name = "adapter"
    # True for methods whose schedule needs the run's number of optimizer steps (AdaLoRA's rank budget)
    needs_total_steps = False

    def __init__(self, target_modules="released_script", parts=PARTS, seed: int = 0, exclude_modules=()):
        unknown = [p for p in parts if p not in PARTS]
        if unknown or not parts:
            raise ValueError(f"{type(self).__name__}: parts must be a non-empty subset of {PARTS}, got {parts!r}")
        self.target_modules = target_modules
        self.exclude_modules = list(exclude_modules or [])
        self.parts = tuple(parts)
        self.seed = seed
        self.components: Dict[str, nn.Module] = {}
        self.base_counts: Dict[str, int] = {}
        self.target_names: Dict[str, List[str]] = {}

    @classmethod
    def from_config(cls, config: SeLoRAConfig, seed: int = 0, total_steps: Optional[int] = None,
                    **options) -> "AdapterMethod":
        """The method on the layers `config` selects (its target_modules and exclude_modules), with its own
        defaults for the rest unless `options` override them. total_steps: the run's optimizer steps, passed
        on to methods that need it (`needs_total_steps`)."""
        options = {"target_modules": config.target_modules, "exclude_modules": config.exclude_modules, **options}
        if cls.needs_total_steps:
            options.setdefault("total_steps", total_steps)
        return cls(seed=seed, **options)

    @property
    def models(self) -> Dict[str, nn.Module]:
        return self.components

    # ---------------------------------------------------------------- trainer interface
    def inject(self, components: Dict[str, nn.Module]) -> Dict[str, List[str]]:
        """Adapts the targeted linears of each part ({"unet": ..., "text_encoder": ...}) in place and freezes
        everything else; returns part -> adapted module names (relative to the part)."""
        if self.components:
            raise RuntimeError(f"{self.name}: inject() was already called; build a new method per model")
        if not isinstance(components, dict):
            raise TypeError(f"{self.name}.inject takes a dict {{'unet': unet, 'text_encoder': text_encoder}}, "
                            f"got {type(components).__name__}")
        missing = [part for part in self.parts if components.get(part) is None]
        if missing:
            raise ValueError(f"{self.name}: parts {missing} are listed in parts={self.parts} but missing from "
                             f"inject(components) (got keys {sorted(components)})")
        for part in self.parts:
            model = components[part]
            model.requires_grad_(False)
            self.base_counts[part] = part_parameter_count(model)
            names = resolve_target_names(model, self.target_modules, self.exclude_modules, part)
            if not names:
                raise ValueError(f"{self.name}: target_modules={self.target_modules!r} (exclude_modules="
                                 f"{self.exclude_modules!r}) matched no nn.Linear of {type(model).__name__} "
                                 f"(part {part!r})")
            self.target_names[part] = names
            self.components[part] = model
        self._inject_parts()
        return dict(self.target_names)

    def injected_layers(self, part: str, layer_type: type, expected: str):
        """(path, layer) of every target of `part`, checked to be a `layer_type` after injection."""
        model = self.models[part]
        for path in self.target_names[part]:
            layer = model.get_submodule(path)
            if not isinstance(layer, layer_type):
                raise RuntimeError(f"{self.name}: {part}.{path} is {type(layer).__name__}, expected {expected}")
            yield path, layer

    def trainable_parameters(self) -> List[nn.Parameter]:
        self._check_injected()
        params, seen = [], set()
        for model in self.components.values():
            for param in model.parameters():
                if param.requires_grad and id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
        return params

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        # the paper trains every method with Adam at a constant lr; no weight decay, like SeLoRA's optimizer
        return torch.optim.AdamW(self.trainable_parameters(), lr=lr, weight_decay=0.0)

    def attach(self, optimizer, grad_scaler=None, gradient_accumulation_steps: int = 1) -> None:
        """Called once the (possibly accelerate-wrapped) optimizer exists."""

    def before_forward(self, step: int) -> None:
        """Called before the forward of every batch of optimizer step `step`."""

    def extra_loss(self) -> Optional[torch.Tensor]:
        """A term the trainer adds to the diffusion loss (None: nothing)."""
        return None

    def after_step(self, step: int, closure: Optional[Callable[[], torch.Tensor]] = None) -> list:
        """Called after each optimizer step; returns events worth logging (e.g. expansions). closure: recomputes
        the loss of this step's batch (SeLoRA's released-script rule needs it)."""
        return []

    def ranks(self) -> Dict[str, int]:
        """Qualified module name -> the rank it uses at inference now (the per-module rank log columns)."""
        raise NotImplementedError

    def total_rank(self) -> int:
        return sum(self.ranks().values())

    def describe(self) -> dict:
        """What must match between a checkpoint and the run resuming it."""
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        described = {"method": self.name, "target_modules": targets, "parts": list(self.parts), **self._options()}
        if self.exclude_modules:  # only when set: checkpoints written before it existed still resume
            described["exclude_modules"] = list(self.exclude_modules)
        return described

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def parameter_report(self) -> Dict[str, Dict[str, float]]:
        """Per part and in total: trainable parameters, base (frozen model) parameters, trainable % of base;
        plus `effective` (parameters of the ranks in use: differs for AdaLoRA's masked ranks)."""
        self._check_injected()
        report = {}
        total_trainable = total_base = total_effective = 0
        for part, model in self.components.items():
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            effective = self._effective_count(part)
            base = self.base_counts[part]
            report[part] = {"trainable": trainable, "base": base, "percent": percent(trainable, base),
                            "effective": effective, "modules": len(self.target_names[part])}
            total_trainable += trainable
            total_base += base
            total_effective += effective
        report["total"] = {"trainable": total_trainable, "base": total_base,
                           "percent": percent(total_trainable, total_base), "effective": total_effective,
                           "modules": sum(len(v) for v in self.target_names.values())}
        return report

    # ---------------------------------------------------------------- files
    def adapter_tensors(self) -> Dict[str, torch.Tensor]:
        """Every trainable adapter tensor by qualified name (`<part>.<parameter path>`)."""
        self._check_injected()
        return {f"{part}.{name}": param.detach().clone().contiguous().cpu()
                for part, model in self.components.items()
                for name, param in model.named_parameters() if param.requires_grad}

    def save(self, path, extra_metadata: Optional[dict] = None) -> Path:
        """Writes the raw adapter tensors and the method description to a safetensors file (for resume and
        `load`; for diffusers use `export`)."""
        header = {"format": "pt", "adapter_method": self.name,
                  "describe": json.dumps(self.describe(), sort_keys=True),
                  "extra": json.dumps(extra_metadata or {}, sort_keys=True, default=str)}
        return atomic_save_safetensors(self.adapter_tensors(), Path(path), header)

    def load(self, path) -> dict:
        """Loads tensors written by `save` into the injected adapters; returns the extra metadata."""
        self._check_injected()
        path = Path(path)
        saved, metadata = read_safetensors(path, what=f"{self.name}.load: adapter file")
        if metadata.get("adapter_method") != self.name:
            raise ValueError(f"{path}: written by method {metadata.get('adapter_method')!r}, loading into "
                             f"{self.name!r}")
        current = {f"{part}.{name}": param for part, model in self.components.items()
                   for name, param in model.named_parameters() if param.requires_grad}
        if set(saved) != set(current):
            extra, missing = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
            raise ValueError(f"{path}: adapter tensors do not match the {self.name} model: "
                             f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
        with torch.no_grad():
            for key, param in current.items():
                if saved[key].shape != param.shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(saved[key].shape)}, the model expects "
                                     f"{tuple(param.shape)}")
                param.copy_(saved[key])
        return json.loads(metadata.get("extra", "{}"))

    def export(self, directory, weight_name: str = PEFT_WEIGHT_NAME) -> Path:
        """Writes a diffusers LoRA file (`<part>.<path>.lora_A/B.weight`, scale folded into B, per-module
        ranks in the metadata) that `StableDiffusionPipeline.load_lora_weights(directory)` loads."""
        self._check_injected()
        tensors, metadata = {}, {}
        for part in self.components:
            factors = self._export_part(part)
            ranks = {}
            for path, (lora_a, lora_b) in factors.items():
                if lora_a.shape[0] == 0:
                    continue  # AdaLoRA may mask a module to rank 0: it then adds nothing
                tensors[f"{part}.{path}.lora_A.weight"] = lora_a.detach().float().contiguous().cpu()
                tensors[f"{part}.{path}.lora_B.weight"] = lora_b.detach().float().contiguous().cpu()
                ranks[path] = int(lora_a.shape[0])
            if not ranks:
                continue
            metadata.update({f"{part}.{k}": v for k, v in peft_lora_metadata(ranks).items()})
        if not tensors:
            raise ValueError(f"{self.name}.export: every adapted module has rank 0, nothing to write")
        header = {"format": "pt", "lora_adapter_metadata": json.dumps(metadata, indent=2, sort_keys=True),
                  "adapter_method": self.name}
        return atomic_save_safetensors(tensors, Path(directory) / weight_name, header)

    def delta_weights(self) -> Dict[str, torch.Tensor]:
        """Qualified module name -> the weight update B A (scale included) the adapter adds at inference."""
        deltas = {}
        for part in self.components:
            for path, (lora_a, lora_b) in self._export_part(part).items():
                deltas[f"{part}.{path}"] = lora_b.detach().double() @ lora_a.detach().double()
        return deltas

    # ---------------------------------------------------------------- for subclasses
    def _inject_parts(self) -> None:
        raise NotImplementedError

    def _export_part(self, part: str) -> Dict[str, tuple]:
        """Relative module path -> (A (r x in), B (out x r) with the inference scale folded in)."""
        raise NotImplementedError

    def _effective_count(self, part: str) -> int:
        return sum(a.shape[0] * (a.shape[1] + b.shape[0]) for a, b in self._export_part(part).values())

    def _options(self) -> dict:
        return {}

    def _check_injected(self) -> None:
        if not self.components:
            raise RuntimeError(f"{self.name}: call inject(unet, text_encoder) first")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(parts={self.parts}, target_modules={self.target_modules!r}, "
                f"exclude_modules={self.exclude_modules!r})")
