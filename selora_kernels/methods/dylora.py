"""DyLoRA baseline (Valipour et al. 2023; official code huawei-noah/Efficient-NLP), max rank 4.

Each training step draws one rank index b uniformly from {0, ..., r-1} (one draw for the whole model). The
forward then uses only the first b+1 components with scale (alpha / r) * r / (b+1) = alpha / (b+1):

    y = x W0^T + b0 + alpha/(b+1) * x A[:b+1]^T B[:, :b+1]^T

and only component b is trained: components < b enter the forward detached. Outside a step (inference,
validation) the full rank r with scale alpha / r is used.

Each component is its own Parameter (1 x in row of A, out x 1 column of B), as in kohya's DyLoRA: a component
that gets no gradient this step then has `.grad = None`, so Adam/AdamW skip it entirely (no momentum drift, no
weight decay). With one (r x in) Parameter, as in the official code, Adam's momentum would keep moving the
detached components -- "only component b trained" would hold for the gradient but not for the update.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..integrations.targets import set_submodule
from .base import AdapterMethod


class DyLoRALinear(nn.Module):
    """nn.Linear (frozen, shared) plus a DyLoRA adapter of max rank `max_rank`.

    `active_index` = b selects the truncated training forward; None means full rank.
    """

    def __init__(self, base: nn.Linear, max_rank: int = 4, alpha: float = 4.0, name: Optional[str] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"DyLoRALinear{f' ({name})' if name else ''} needs an nn.Linear base, "
                            f"got {type(base).__name__}")
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"DyLoRALinear: max_rank must be an int >= 1, got {max_rank!r}")
        self.base_layer = base
        base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.max_rank, self.alpha = max_rank, float(alpha)
        self.dylora_name = name or f"DyLoRALinear({self.in_features}->{self.out_features})"
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        # peft/LoRA default init: A Kaiming-uniform (a = sqrt(5)), B = 0, so the adapter starts as a no-op
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(1, self.in_features, **factory).uniform_(-bound, bound))
             for _ in range(max_rank)])
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(self.out_features, 1, **factory)) for _ in range(max_rank)])
        self.active_index: Optional[int] = None

    def set_active_index(self, index: Optional[int]) -> None:
        if index is not None and not 0 <= index < self.max_rank:
            raise ValueError(f"{self.dylora_name}: rank index must be in 0..{self.max_rank - 1} or None, got {index}")
        self.active_index = index

    @property
    def rank(self) -> int:
        """Components used by the forward now: b + 1 during a step, max_rank otherwise."""
        return self.max_rank if self.active_index is None else self.active_index + 1

    def factors(self, index: Optional[int] = None):
        """(A, B, scale) of the forward with rank index `index` (None: full rank); in a truncated forward the
        components below `index` are detached so only component `index` gets a gradient."""
        if index is None:
            return (torch.cat(list(self.lora_A), 0), torch.cat(list(self.lora_B), 1), self.alpha / self.max_rank)
        rows = [a.detach() for a in self.lora_A[:index]] + [self.lora_A[index]]
        cols = [b.detach() for b in self.lora_B[:index]] + [self.lora_B[index]]
        # scale (alpha / r) * r / (b + 1): the truncated update keeps the magnitude of the full one
        return torch.cat(rows, 0), torch.cat(cols, 1), self.alpha / (index + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        lora_a, lora_b, scale = self.factors(self.active_index)
        update = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scale
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        return f"max_rank={self.max_rank}, alpha={self.alpha:g}, active_index={self.active_index}"


class DyLoRAMethod(AdapterMethod):
    """DyLoRA on SeLoRA's target layers. `seed` fixes the sequence of drawn ranks."""

    name = "dylora"

    def __init__(self, max_rank: int = 4, alpha=None, seed: int = 0, target_modules="released_script",
                 parts=("unet", "text_encoder"), exclude_modules=()):
        super().__init__(target_modules, parts, seed, exclude_modules)
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"DyLoRAMethod: max_rank must be an int >= 1, got {max_rank!r}")
        self.max_rank = max_rank
        self.alpha = float(max_rank if alpha is None else alpha)
        self.generator = torch.Generator().manual_seed(seed)
        self.last_index: Optional[int] = None

    def _inject_parts(self) -> None:
        self.modules: Dict[str, DyLoRALinear] = {}
        for part, model in self.models.items():
            for path in self.target_names[part]:
                module = DyLoRALinear(model.get_submodule(path), self.max_rank, self.alpha, name=f"{part}.{path}")
                set_submodule(model, path, module)
                self.modules[f"{part}.{path}"] = module

    def draw_index(self) -> int:
        return int(torch.randint(0, self.max_rank, (1,), generator=self.generator))

    def before_forward(self, step: int) -> None:
        self._check_injected()
        self.last_index = self.draw_index()
        for module in self.modules.values():
            module.set_active_index(self.last_index)

    def after_step(self, step: int, closure=None) -> list:
        # back to full rank: validation and generation between steps see the whole adapter
        for module in self.modules.values():
            module.set_active_index(None)
        return []

    def _options(self) -> dict:
        return {"max_rank": self.max_rank, "alpha": self.alpha, "seed": self.seed}

    def state_dict(self) -> dict:
        # the rank-draw generator: a resumed run draws the ranks the original would have
        return {"generator": self.generator.get_state(), "last_index": self.last_index}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.last_index = state.get("last_index")

    def ranks(self) -> Dict[str, int]:
        return {name: module.max_rank for name, module in self.modules.items()}

    def _export_part(self, part: str):
        factors = {}
        for path in self.target_names[part]:
            module = self.models[part].get_submodule(path)
            lora_a, lora_b, scale = module.factors(None)
            factors[path] = (lora_a, lora_b * scale)
        return factors
