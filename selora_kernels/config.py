"""Options of a SeLoRA adapter, validated once, and the capacity rule shared by every layer."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

SCALING_MODES = ("fixed_init", "alpha_over_r")
# "released_script": the rule and the adapted layers of the paper's released training script.
TRIAL_MODES = ("same_backward", "released_script")
TARGET_PRESETS = ("released_script", "all_linear")
# The released-script mode was first named "reference_code"; that spelling is still accepted for one
# release, and normalised on construction so that "reference" means only the float64 oracle (ops/reference.py).
MODE_ALIASES = {"reference_code": "released_script"}

# Kernels pad the live slots plus the one trial slot to a multiple of the MMA width (16): a capacity of
# 16k - 1 keeps the trial slot inside the same padded block (docs/kernel_design.md).
SLOT_BLOCK = 16


def canonical_mode(name):
    """The current spelling of a trial mode or target preset (old aliases mapped); anything else unchanged."""
    return MODE_ALIASES.get(name, name) if isinstance(name, str) else name


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
    threshold (lambda), interval (t), max_rank: the expansion test (docs/algorithm.md).
    trial: "same_backward" (library default: per-sample Fisher of a trial slot in the training backward)
    or "released_script" (the released script's rule).
    target_modules: a preset name ("released_script", "all_linear") or a list of name patterns.
    The old spelling "reference_code" of "released_script" is accepted and normalised here.
    """

    r_init: int = 1
    alpha: float = 8.0
    capacity: Optional[int] = None
    scaling: str = "fixed_init"
    threshold: float = 1.1
    interval: int = 40
    max_rank: Optional[int] = None
    trial: str = "same_backward"
    target_modules: object = "released_script"
    exclude_modules: list = field(default_factory=list)

    def __post_init__(self):
        self.trial = canonical_mode(self.trial)
        self.target_modules = canonical_mode(self.target_modules)
        validate_adapter_options(self.r_init, self.alpha, self.capacity, self.scaling)
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)
                and self.threshold > 0):
            raise ValueError(f"threshold (lambda) must be a positive number, got {self.threshold!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval (t) must be an int >= 1, got {self.interval!r}")
        if self.max_rank is not None and (not isinstance(self.max_rank, int) or self.max_rank < self.r_init):
            raise ValueError(f"max_rank must be None or an int >= r_init ({self.r_init}), got {self.max_rank!r}")
        if self.trial not in TRIAL_MODES:
            raise ValueError(f"trial must be one of {TRIAL_MODES}, got {self.trial!r}")
