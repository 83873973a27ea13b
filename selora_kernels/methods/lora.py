"""LoRA baseline: peft's LoRA at a fixed rank (paper: r = 4) on SeLoRA's target layers.

Injected with peft's `inject_adapter_in_model` on each part, because transformers 5.24's own
`text_encoder.add_adapter` needs peft >= 0.22, newer than the pinned peft. Defaults follow diffusers'
train_text_to_image_lora.py: lora_alpha = r (scale 1), Gaussian init of A, B = 0.
"""
from __future__ import annotations

from typing import Dict

from .base import AdapterMethod

ADAPTER_NAME = "default"


class LoRAMethod(AdapterMethod):
    name = "lora"

    def __init__(self, rank: int = 4, alpha=None, dropout: float = 0.0, init_lora_weights="gaussian",
                 target_modules="released_script", parts=("unet", "text_encoder"), seed: int = 0,
                 exclude_modules=()):
        super().__init__(target_modules, parts, seed, exclude_modules)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRAMethod: rank must be an int >= 1, got {rank!r}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.dropout = float(dropout)
        self.init_lora_weights = init_lora_weights

    def _inject_parts(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model  # peft: only the baselines need it

        for part, model in self.models.items():
            config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                init_lora_weights=self.init_lora_weights, target_modules=self.target_names[part])
            inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)

    def _options(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "init_lora_weights": str(self.init_lora_weights)}

    def _lora_layers(self, part: str):
        from peft.tuners.lora import LoraLayer  # peft: only the baselines need it

        return self.injected_layers(part, LoraLayer, "a peft LoRA layer")

    def ranks(self) -> Dict[str, int]:
        return {f"{part}.{path}": int(layer.r[ADAPTER_NAME])
                for part in self.models for path, layer in self._lora_layers(part)}

    def _export_part(self, part: str):
        factors = {}
        for path, layer in self._lora_layers(part):
            scale = layer.scaling[ADAPTER_NAME]
            factors[path] = (layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight * scale)
        return factors
