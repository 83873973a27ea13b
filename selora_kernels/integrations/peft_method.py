"""SeLoRA as a peft method: `SeLoRAConfig` goes wherever peft takes a `LoraConfig`.

    unet.add_adapter(SeLoRAConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    model = peft.get_peft_model(text_encoder, SeLoRAConfig(target_modules="all_linear"))
    peft.inject_adapter_in_model(SeLoRAConfig(), model)

Registration writes SeLoRA into peft's method tables (config class, tuner class, key prefix) under its own
`SeLoRAPeftType.SELORA`: peft's `register_peft_method` only takes names of peft's closed `PeftType` enum.
The tuner layer is `SeLoRALayer`: the library's `SeLoRALinear` plus peft's `BaseTunerLayer` interface
(adapter switching, scale calls, merge/unmerge), so diffusers' and peft's helpers treat it like a LoRA layer.

peft's state-dict functions round-trip grown adapters through two tuner hooks:
- `get_peft_model_state_dict` emits each module's live slots only, `<path>.lora_A.weight` (r x in) and
  `<path>.lora_B.weight` (out x r) with the scale s folded into B: the LoRA layout (per-module ranks read
  from the shapes) that diffusers' `load_lora_weights` loads with scale 1.
- `set_peft_model_state_dict` (and diffusers' `convert_unet_state_dict_to_peft` path) sizes each module to
  the loaded rank and to the capacity growth would have given it (config.capacity_for_rank), before an
  optimizer state of that capacity is loaded. B is unfolded (exact when s is a power of two; the exact
  tensors and the trial rows also ride in the optimizer state, expansion/optimizer_hooks.py).
"""
from __future__ import annotations

import copy
import os
from typing import Dict, Optional

import peft
import torch
from packaging.version import Version
from peft.mapping import (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING,
                          PEFT_TYPE_TO_TUNER_MAPPING)
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ..config import SeLoRAConfig, SeLoRAPeftType
from ..nn.selora_linear import SeLoRALinear
from .targets import qualified_name, resolve_target_names

# the peft releases this integration is tested on (it uses peft's tuner hooks, which are internal API)
PEFT_TESTED_RANGE = ("0.21.0", "0.22.0")
UNTESTED_PEFT_ENV = "SELORA_ALLOW_UNTESTED_PEFT"
PEFT_PREFIX = "lora_"  # the parameter names are LoRA's, so diffusers' converters read the keys
NAME_PREFIX_ATTR = "_selora_name_prefix"  # set by inject_selora on its copy of the config (not a field)


def check_peft_version(version: str = peft.__version__) -> None:
    low, high = PEFT_TESTED_RANGE
    if not Version(low) <= Version(version) < Version(high) and os.environ.get(UNTESTED_PEFT_ENV) != "1":
        raise ImportError(f"selora_kernels registers SeLoRA as a peft method through peft's tuner hooks, tested "
                          f"on peft>={low},<{high}; found peft {version}. Install a tested release "
                          f"(pip install 'peft>={low},<{high}') or set {UNTESTED_PEFT_ENV}=1 to try this one")


class SeLoRALayer(SeLoRALinear, BaseTunerLayer):
    """SeLoRALinear with peft's tuner-layer interface; one adapter per layer (SeLoRA's ranks are per module)."""

    # SeLoRA's A and B are Parameters of the layer itself, not per-adapter dicts: peft's generic per-adapter
    # loops have nothing to do, the tuner below selects and loads them
    adapter_layer_names = ()
    other_param_names = ()
    # peft's layers have this flag, which diffusers' layerwise casting toggles (disable_input_dtype_casting);
    # SeLoRA never casts its input, the flag only has to exist
    cast_input_dtype_enabled = True

    @classmethod
    def from_config(cls, linear: nn.Linear, config: SeLoRAConfig, adapter_name: str, name: str) -> "SeLoRALayer":
        layer = cls.from_linear(linear, r_init=config.r, alpha=float(config.lora_alpha), capacity=config.capacity,
                                scaling=config.scaling, name=name, init_lora_weights=config.init_lora_weights)
        layer.selora_config = config  # the expansion settings attach_expansion reads
        layer._active_adapter = adapter_name
        layer._disable_adapters = False
        layer.merged_adapters = []
        return layer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return self.base_layer(x)
        return super().forward(x)

    # diffusers' LoRA-scale calls (cross_attention_kwargs={"scale": w}, set_adapters(..., weights))
    def _base_scale(self) -> float:
        return self.alpha / (self.rank if self.scaling == "alpha_over_r" else self.r_init)

    def set_scale(self, adapter: str, scale: float) -> None:
        self.scale = self._base_scale() * scale

    def scale_layer(self, scale: float) -> None:
        self.scale *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        self.scale = self._base_scale() if scale is None else self.scale / scale

    # peft's merge_and_unload / merge_adapter
    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        if self.merged:
            return
        merged = self.merged_weight()
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"{self.selora_name}: NaNs/infs in the merged weight; the adapter is broken")
        with torch.no_grad():
            self.base_layer.weight.copy_(merged)
        self.merged_adapters.append(self._active_adapter if isinstance(self._active_adapter, str)
                                    else self._active_adapter[0])

    def unmerge(self) -> None:
        if not self.merged:
            return
        r = self.rank
        delta = self.scale * (self.lora_B[:, :r].double() @ self.lora_A[:r].double())
        with torch.no_grad():
            self.base_layer.weight.copy_((self.weight.double() - delta).to(self.weight.dtype))
        self.merged_adapters = []


class SeLoRAModel(BaseTuner):
    """peft tuner that puts SeLoRALayer on the nn.Linear modules SeLoRAConfig targets."""

    prefix = PEFT_PREFIX
    tuner_layer_cls = SeLoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _check_new_adapter_config(self, config: SeLoRAConfig) -> None:
        if not isinstance(config, SeLoRAConfig):
            raise TypeError(f"SeLoRAModel needs a SeLoRAConfig, got {type(config).__name__}")
        if len(self.peft_config) > 1:
            raise ValueError(f"SeLoRA supports one adapter per model; this model already has "
                             f"{sorted(self.peft_config)[:-1]}")

    def _resolve_targets(self, peft_config: SeLoRAConfig, model: nn.Module) -> None:
        # the presets depend on the model (text encoder or UNet): resolve them once, against the whole model;
        # patterns also match the name under inject_selora's prefix ("unet.down_blocks...")
        prefix = getattr(peft_config, NAME_PREFIX_ATTR, "")
        self._selora_targets = set(resolve_target_names(model, peft_config.target_modules,
                                                        peft_config.exclude_modules, prefix))
        self._selora_excluded = set(resolve_target_names(model, peft_config.target_modules, (), prefix)) \
            - self._selora_targets

    def _prepare_model(self, peft_config: SeLoRAConfig, model: nn.Module) -> None:
        self._resolve_targets(peft_config, model)

    def _check_target_module_exists(self, peft_config, key: str):
        if getattr(self, "_selora_targets", None) is None:  # peft's state-dict driven injection
            self._resolve_targets(peft_config, self.model)
        if key in self._selora_excluded:
            return _ExcludedModule()  # peft counts it as excluded (and does not warn about exclude_modules)
        return key in self._selora_targets

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key,
                            parameter_name: Optional[str] = None) -> None:
        layer = SeLoRALayer.from_config(target, peft_config, adapter_name, name=current_key)
        setattr(parent, target_name, layer)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        trainable = not any(c.inference_mode for c in self.peft_config.values())
        adapters = {id(p) for m in model.modules() if isinstance(m, SeLoRALinear) for p in (m.lora_A, m.lora_B)}
        for param in model.parameters():
            param.requires_grad_(trainable and id(param) in adapters)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        tensors = {}
        for name, module in model.named_modules():
            if isinstance(module, SeLoRALinear):
                lora_a, lora_b = module.live_factors()
                tensors[f"{name}.lora_A.weight"] = lora_a
                tensors[f"{name}.lora_B.weight"] = lora_b
        return tensors

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        return sized_state_dict(model, config, state_dict)


def sized_state_dict(model: nn.Module, config: SeLoRAConfig, state_dict: Dict[str, torch.Tensor]):
    """LoRA-layout live factors -> the SeLoRA modules' own keys (lora_A, lora_B at the capacity growth gives
    that rank, live_rank), which their load hook sizes the buffers for. Other keys pass through."""
    out = dict(state_dict)
    peft_prefix = "base_model.model."
    for name, module in model.named_modules():
        if not isinstance(module, SeLoRALinear):
            continue
        found = next((c for c in (name, name.removeprefix(peft_prefix), peft_prefix + name)
                      if f"{c}.lora_A.weight" in out), None)
        if found is None:
            continue
        if f"{found}.lora_B.weight" not in out:
            raise ValueError(f"{module.selora_name}: the state dict has {found}.lora_A.weight but no "
                             f"{found}.lora_B.weight")
        lora_a, lora_b = out.pop(f"{found}.lora_A.weight"), out.pop(f"{found}.lora_B.weight")
        rank = lora_a.shape[0]
        if lora_a.shape != (rank, module.in_features) or lora_b.shape != (module.out_features, rank):
            raise ValueError(f"{module.selora_name}: loaded A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do "
                             f"not fit a module with in={module.in_features}, out={module.out_features} "
                             f"(expected A (r, {module.in_features}), B ({module.out_features}, r))")
        if rank < 1:
            raise ValueError(f"{module.selora_name}: loaded rank 0; a SeLoRA module has at least one slot")
        capacity = config.capacity_for_rank(rank)
        scale = module.alpha / (rank if module.scaling == "alpha_over_r" else module.r_init)
        dtype, device = module.lora_A.dtype, module.lora_A.device
        full_a = torch.zeros(capacity, module.in_features, dtype=dtype, device=device)
        full_b = torch.zeros(module.out_features, capacity, dtype=dtype, device=device)
        full_a[:rank] = lora_a.to(device=device, dtype=dtype)
        full_b[:, :rank] = (lora_b.to(device=device, dtype=torch.float64) / scale).to(dtype)
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = full_a, full_b
        out[f"{name}.live_rank"] = torch.tensor(rank, dtype=torch.int64)
    return out


def inject_selora(model: nn.Module, config: SeLoRAConfig, prefix: str = "",
                  adapter_dtype=None) -> Dict[str, SeLoRALinear]:
    """peft's `inject_adapter_in_model(config, model)` with SeLoRA's errors and names; returns qualified name
    -> module. Everything but the adapters is frozen.

    prefix: prepended to module names (e.g. "unet", "text_encoder") in the returned dict and in each
    module's `selora_name` (which errors, logs and adapter files use). A model that already has SeLoRA
    modules is left as it is (its modules are returned), so injecting twice is harmless.
    adapter_dtype: A, B and the trial row in this dtype (default: the base weight's).
    """
    if not isinstance(config, SeLoRAConfig):
        raise TypeError(f"inject_selora needs a SeLoRAConfig, got {type(config).__name__}")
    if not any(isinstance(m, SeLoRALinear) for m in model.modules()):
        if not resolve_target_names(model, config.target_modules, config.exclude_modules, prefix):
            linear_names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
            shown = ", ".join(linear_names[:8]) + (", ..." if len(linear_names) > 8 else "")
            raise ValueError(f"inject_selora({type(model).__name__}{f', prefix={prefix!r}' if prefix else ''}): "
                             f"target_modules={config.target_modules!r} (exclude={config.exclude_modules!r}) "
                             f"matched none of its {len(linear_names)} nn.Linear modules; some of them: [{shown}]")
        # each model keeps its own copy: peft stores it on the model and may rewrite target_modules
        config = copy.deepcopy(config)
        setattr(config, NAME_PREFIX_ATTR, prefix)
        peft.inject_adapter_in_model(config, model)
    modules: Dict[str, SeLoRALinear] = {}
    for name, module in model.named_modules():
        if isinstance(module, SeLoRALinear):
            module.selora_name = qualified_name(prefix, name)
            if adapter_dtype is not None and module.lora_A.dtype != adapter_dtype:
                with torch.no_grad():
                    for param in (module.lora_A, module.lora_B):
                        param.data = param.data.to(adapter_dtype)
                module.trial_row = module.trial_row.to(adapter_dtype)
            modules[module.selora_name] = module
    return modules


def register() -> None:
    """Puts SeLoRA into peft's method tables (idempotent)."""
    check_peft_version()
    peft_type = SeLoRAPeftType.SELORA
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = SeLoRAConfig
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = SeLoRAModel
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PEFT_PREFIX


register()
