"""Options of a SeLoRA adapter, validated once, and the capacity rule shared by every layer.

`SeLoRAConfig` is a peft `PeftConfig` when peft is installed (so diffusers' `add_adapter`, peft's
`get_peft_model` and `inject_adapter_in_model` take it where they take a `LoraConfig`; the method itself is
registered with peft in integrations/peft_method.py); without peft it is a plain dataclass with the same
fields, and everything below the integrations layer works the same.
"""
from __future__ import annotations

import enum
import math
from dataclasses import InitVar, dataclass, field
from typing import Optional, Union

try:
    from peft import PeftConfig as _ConfigBase  # optional below the integrations layer (GPU image: no peft)
except ImportError:  # pragma: no cover - exercised only where peft is absent
    @dataclass
    class _ConfigBase:
        """The PeftConfig fields, for a machine without peft."""

        task_type: Optional[str] = None
        peft_type: Optional[str] = None
        auto_mapping: Optional[dict] = None
        peft_version: Optional[str] = None
        base_model_name_or_path: Optional[str] = None
        revision: Optional[str] = None
        inference_mode: bool = False

        def __post_init__(self):
            pass


class SeLoRAPeftType(str, enum.Enum):
    """SeLoRA's member of peft's method-type space: peft's own PeftType enum is closed, and a str enum whose
    name equals its value compares and hashes like the string written into adapter_config.json."""

    SELORA = "SELORA"

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


INIT_LORA_WEIGHTS = (True, "gaussian")


@dataclass
class SeLoRAConfig(_ConfigBase):
    """What to adapt and how adapters grow; LoraConfig's argument names where they mean the same here.

    r (initial rank, >= 1), lora_alpha (s = lora_alpha / r for life with scaling "fixed_init"), capacity
    (slots allocated; default the smallest 16k - 1 > r), scaling ("fixed_init", or "alpha_over_r": s =
    lora_alpha / rank, B rescaled at each growth), init_lora_weights (True: Kaiming-uniform rows of A as
    peft's default; "gaussian": the initial rows N(0, 1/r) as peft's, rows added by growth stay
    Kaiming-uniform). threshold (lambda), interval (t), max_rank: the expansion test (docs/algorithm.md).
    trial: "same_backward" (per-sample Fisher of a trial slot in the training backward) or
    "released_script" (the released script's rule). target_modules: a preset ("released_script",
    "all_linear") or a list of name patterns; exclude_modules: patterns removed from that set.
    The old spellings r_init= and alpha= (and "reference_code") are accepted and normalised here.
    """

    r: int = 1
    lora_alpha: float = 8.0
    capacity: Optional[int] = None
    scaling: str = "fixed_init"
    init_lora_weights: Union[bool, str] = True
    threshold: float = 1.1
    interval: int = 40
    max_rank: Optional[int] = None
    trial: str = "same_backward"
    target_modules: object = "released_script"
    exclude_modules: list = field(default_factory=list)
    r_init: InitVar[Optional[int]] = None
    alpha: InitVar[Optional[float]] = None

    def __post_init__(self, r_init=None, alpha=None):
        super().__post_init__()
        self.peft_type = SeLoRAPeftType.SELORA
        if r_init is not None:
            self.r = r_init
        if alpha is not None:
            self.lora_alpha = alpha
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        self.exclude_modules = list(self.exclude_modules or [])
        self.trial = canonical_mode(self.trial)
        self.target_modules = canonical_mode(self.target_modules)
        validate_adapter_options(self.r, self.lora_alpha, self.capacity, self.scaling)
        if self.init_lora_weights not in INIT_LORA_WEIGHTS:
            raise ValueError(f"init_lora_weights must be one of {INIT_LORA_WEIGHTS} for SeLoRA (B starts at zero so "
                             f"that growth never changes the output), got {self.init_lora_weights!r}")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)
                and self.threshold > 0):
            raise ValueError(f"threshold (lambda) must be a positive number, got {self.threshold!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval (t) must be an int >= 1, got {self.interval!r}")
        if self.max_rank is not None and (not isinstance(self.max_rank, int) or self.max_rank < self.r):
            raise ValueError(f"max_rank must be None or an int >= r ({self.r}), got {self.max_rank!r}")
        if self.trial not in TRIAL_MODES:
            raise ValueError(f"trial must be one of {TRIAL_MODES}, got {self.trial!r}")

    def capacity_for_rank(self, rank: int) -> int:
        """The capacity a module of this config has at live rank `rank`: the initial capacity, doubled
        (next_capacity) until it holds the rank, as growth does."""
        capacity = self.capacity if self.capacity is not None else default_capacity(self.r)
        while capacity < rank:
            capacity = next_capacity(capacity)
        return capacity


# InitVar defaults would stay behind as class attributes: config.r_init must not read as None
del SeLoRAConfig.r_init, SeLoRAConfig.alpha
