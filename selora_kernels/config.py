"""Options of a SeLoRA adapter, validated once, and the capacity rule shared by every layer."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

SCALING_MODES = ("fixed_init", "alpha_over_r")

# Kernels pad the live slots plus the one trial slot to a multiple of the MMA width (16): a capacity of
# 16k - 1 keeps the trial slot inside the same padded block (KERNEL_NOTES section 8.2).
SLOT_BLOCK = 16


def default_capacity(rank: int) -> int:
    """Smallest capacity of the form 16k - 1 that holds `rank` slots."""
    return SLOT_BLOCK * math.ceil((rank + 1) / SLOT_BLOCK) - 1


def next_capacity(capacity: int) -> int:
    """Capacity after a growth past the current one: doubles the padded block count."""
    return 2 * (capacity + 1) - 1


def validate_adapter_options(r_init: int, alpha: float, capacity: Optional[int], scaling: str) -> int:
    """Checks the per-module options; returns the capacity to allocate."""
    if isinstance(r_init, bool) or not isinstance(r_init, int):
        raise TypeError(f"r_init must be an int, got {type(r_init).__name__}")
    if r_init < 1:
        raise ValueError(f"r_init must be >= 1, got {r_init}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if scaling not in SCALING_MODES:
        raise ValueError(f"scaling must be one of {SCALING_MODES}, got {scaling!r}")
    if capacity is None:
        return default_capacity(r_init)
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int or None, got {type(capacity).__name__}")
    if capacity < r_init:
        raise ValueError(f"capacity ({capacity}) must be >= r_init ({r_init})")
    return capacity


@dataclass
class SeLoRAConfig:
    """What to adapt and how adapters grow.

    r_init, alpha, capacity, scaling: per-module adapter options (SeLoRALinear).
    threshold (lambda), interval (t), max_rank: the expansion test (SELORA_SPEC section 2-3).
    trial: "same_backward" (library default: per-sample Fisher of a trial slot in the training backward)
    or "reference_code" (the released script's rule).
    target_modules: a preset name ("reference_code", "all_linear") or a list of name patterns.
    """

    r_init: int = 1
    alpha: float = 8.0
    capacity: Optional[int] = None
    scaling: str = "fixed_init"
    threshold: float = 1.1
    interval: int = 40
    max_rank: Optional[int] = None
    trial: str = "same_backward"
    target_modules: object = "reference_code"
    exclude_modules: list = field(default_factory=list)

    def __post_init__(self):
        validate_adapter_options(self.r_init, self.alpha, self.capacity, self.scaling)
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)
                and self.threshold > 0):
            raise ValueError(f"threshold (lambda) must be a positive number, got {self.threshold!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval (t) must be an int >= 1, got {self.interval!r}")
        if self.max_rank is not None and (not isinstance(self.max_rank, int) or self.max_rank < self.r_init):
            raise ValueError(f"max_rank must be None or an int >= r_init ({self.r_init}), got {self.max_rank!r}")
        if self.trial not in ("same_backward", "reference_code"):
            raise ValueError(f"trial must be 'same_backward' or 'reference_code', got {self.trial!r}")
