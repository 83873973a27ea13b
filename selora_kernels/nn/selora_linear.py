"""SeLoRALinear: a drop-in nn.Linear with a frozen base and a growing low-rank adapter.

    y = x W0^T + b0 + s (x A^T) B^T

A (capacity x in) and B (out x capacity) are Parameters whose first `rank` slots are live; dead slots are
exactly zero and get exactly zero gradient, so no optimizer moves them. The next row K of A (the trial row)
lives in a buffer outside the Parameter, so neither the optimizer nor weight decay can touch it.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..config import validate_adapter_options
from ..fisher_stats import (FisherScores, fi_scores, fisher_dtype, raise_on_nonfinite_inputs, statistics_shape,
                            statistics_summary)
from ..ops.capacity import kaiming_uniform_bound
from ..ops.reference import cast
from ..ops.selora_linear import SeLoRALinearFunction
from .slots import register_adapter_parameter


class SeLoRALinear(nn.Module):
    """nn.Linear with a frozen base (W0, b0) and a SeLoRA adapter of run-time rank.

    Options: r_init (>= 1), alpha, capacity (slots allocated; default the smallest 16k - 1 >= r_init),
    scaling ("fixed_init": s = alpha / r_init for life, the released code; "alpha_over_r": s = alpha / r,
    B rescaled at each growth so the output does not jump). adapter_dtype defaults to the base dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r_init: int = 1,
                 alpha: float = 8.0, capacity: Optional[int] = None, scaling: str = "fixed_init",
                 device=None, dtype=None, adapter_dtype=None, init_lora_weights=True):
        super().__init__()
        for label, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        capacity = validate_adapter_options(r_init, alpha, capacity, scaling)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from_base(base, r_init, float(alpha), capacity, scaling, adapter_dtype, init_lora_weights)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, r_init: int = 1, alpha: float = 8.0,
                    capacity: Optional[int] = None, scaling: str = "fixed_init", adapter_dtype=None,
                    name: Optional[str] = None, init_lora_weights=True) -> "SeLoRALinear":
        """Wraps an existing nn.Linear (kept as `base_layer`, frozen)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SeLoRALinear.from_linear needs an nn.Linear base"
                            f"{f' for {name}' if name else ''}, got {type(linear).__name__}")
        capacity = validate_adapter_options(r_init, alpha, capacity, scaling)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._init_from_base(linear, r_init, float(alpha), capacity, scaling, adapter_dtype, init_lora_weights)
        if name is not None:
            module.selora_name = name
        return module

    def _init_from_base(self, base: nn.Linear, r_init, alpha, capacity, scaling, adapter_dtype,
                        init_lora_weights=True):
        if init_lora_weights not in (True, "gaussian"):
            raise ValueError(f"init_lora_weights must be True (Kaiming-uniform rows of A) or 'gaussian', "
                             f"got {init_lora_weights!r}")
        weight = base.weight
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.r_init, self.alpha, self.scaling = r_init, alpha, scaling
        self.scale = alpha / r_init
        self.selora_name = f"SeLoRALinear({in_features}->{out_features})"
        # the frozen base stays an nn.Linear under `base_layer` (peft's layout: state-dict keys
        # <name>.base_layer.weight, and unloading gives the original module back)
        base.requires_grad_(False)
        self.base_layer = base
        factory = dict(device=weight.device, dtype=adapter_dtype or weight.dtype)
        self.lora_A = nn.Parameter(torch.zeros(capacity, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, capacity, **factory))
        self.register_buffer("live_rank", torch.tensor(r_init, dtype=torch.int64, device=weight.device))
        self.register_buffer("trial_row", torch.empty(in_features, **factory))
        self._rank = r_init  # host mirror of live_rank: no device sync to read the rank
        # set whenever the buffers are reallocated (growth past capacity, a load at another capacity):
        # DistributedDataParallel, built around the old sizes, no longer averages their gradients
        # (expansion.distributed averages them instead)
        self.reallocated = False
        self._fisher_probe: Optional[torch.Tensor] = None
        self._measured_task = None  # the backward (graph task) that last reached this module while measuring
        self._per_sample_reduction = "mean"
        bound = kaiming_uniform_bound(in_features)
        with torch.no_grad():
            if init_lora_weights == "gaussian":  # peft's "gaussian": N(0, 1/r)
                self.lora_A[:r_init].normal_(0.0, 1.0 / r_init)
            else:
                self.lora_A[:r_init].uniform_(-bound, bound)
            self.trial_row.uniform_(-bound, bound)
        self._tag_adapter_parameters()

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        # s is mirrored in place into a 0-d CPU tensor that torch.compile reads as a graph input (a float
        # attribute would be guarded, so every alpha_over_r growth would recompile); no device sync to read it
        self._scale = float(value)
        if "_scale_tensor" not in self.__dict__:
            self._scale_tensor = torch.tensor(self._scale, dtype=torch.float64)
        else:
            self._scale_tensor.fill_(self._scale)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def _tag_adapter_parameters(self):
        register_adapter_parameter(self.lora_A, self, 0)
        register_adapter_parameter(self.lora_B, self, 1)

    def __setstate__(self, state):
        super().__setstate__(state)  # copy.deepcopy and unpickling: new Parameter objects, register them
        self._tag_adapter_parameters()

    # ---------------------------------------------------------------- properties
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def capacity(self) -> int:
        return self.lora_A.shape[0]

    @property
    def measuring(self) -> bool:
        return self._fisher_probe is not None

    def set_live_rank(self, rank: int, *, device_written: bool = False) -> None:
        """Sets the live rank: the host mirror `rank` and the `live_rank` device tensor together.

        device_written: the device tensor already holds `rank` (ops.capacity.expand_slots_ wrote it), so
        only the host mirror follows (no extra write per module)."""
        if not 0 <= rank <= self.capacity:
            raise ValueError(f"{self.selora_name}: live rank must be in 0..{self.capacity} (the capacity), "
                             f"got {rank}")
        if not device_written:
            with torch.no_grad():
                self.live_rank.fill_(rank)
        self._rank = rank

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.rank}, capacity={self.capacity}, "
                f"scale={self.scale:g}, scaling={self.scaling!r}")

    # ---------------------------------------------------------------- forward
    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        if x.dtype != self.weight.dtype:
            raise TypeError(f"{self.selora_name}: input dtype {x.dtype} does not match the base weight dtype "
                            f"{self.weight.dtype} (cast the input, or run under torch.autocast)")
        return x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.selora_name}: expected input of shape (..., {self.in_features}), "
                             f"got {tuple(x.shape)}")
        if x.device != self.weight.device:
            raise RuntimeError(f"{self.selora_name}: input is on {x.device}, the module on {self.weight.device}; "
                               f"move one of them (model.to(device) or x.to(device))")
        dtype = self._compute_dtype(x)
        if self.trial_row.dtype != self.lora_A.dtype:  # A was cast alone (diffusers' cast_training_params)
            self.trial_row = self.trial_row.to(self.lora_A.dtype)
        num_samples = x.shape[0] if x.dim() > 1 else 1
        if self._fisher_probe is not None and num_samples == 0 and torch.is_grad_enabled():
            raise ValueError(f"{self.selora_name}: an empty batch (input shape {tuple(x.shape)}) while measuring "
                             f"Fisher; per-sample Fisher needs at least 1 sample per batch")
        probe = self._fisher_probe
        if probe is not None and torch.is_grad_enabled():
            # Non-finite inputs are counted by the backward (FISHER_COL_NONFINITE) and raised when the
            # statistics are read: checking x here would cost a pass over x and a host sync per layer.
            multiplier = float(num_samples) if self._per_sample_reduction == "mean" else 1.0
        else:
            probe, multiplier = None, 1.0
        flat = cast(x.reshape(-1, self.in_features), dtype)
        bias = cast(self.bias, dtype) if self.bias is not None else None
        y = SeLoRALinearFunction.apply(flat, cast(self.weight, dtype), bias, cast(self.lora_A, dtype),
                                       cast(self.lora_B, dtype), cast(self.trial_row, dtype), self.live_rank,
                                       probe, self._compiled_scale(), num_samples, multiplier, probe is not None,
                                       torch.is_grad_enabled())
        if probe is not None and not torch.compiler.is_compiling():  # a hook would break the compiled graph
            y.register_hook(self._check_single_use)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _compiled_scale(self):
        # eager: the float (no tensor read per call); compiled alpha_over_r: the tensor, so growth never recompiles
        if self.scaling == "alpha_over_r" and torch.compiler.is_compiling():
            return self._scale_tensor
        return self._scale

    def _check_single_use(self, grad: torch.Tensor) -> None:
        # Per-sample Fisher squares each sample's gradient of this module; a module applied twice to one sample
        # would get the sum of per-use squares, not the square of the summed gradient. Gradient checkpointing
        # runs the forward twice but this hook (and the Fisher backward) once: torch.utils.checkpoint's
        # non-reentrant recompute only refills saved tensors (no backward runs through its graph); the reentrant
        # one's first forward runs without grad (nothing measured, no hook) and its recompute's backward is a
        # nested graph task of its own. So this counts real uses only (tests/training/test_memory_options.py).
        task = torch._C._current_graph_task_id()
        if task != -1 and task == self._measured_task:
            raise RuntimeError(f"{self.selora_name} was applied more than once in one forward while measuring "
                               f"Fisher: per-sample Fisher needs each sample to pass through a module once. "
                               f"Exclude it from the adapted modules (exclude_modules) or give each use its own "
                               f"module")
        self._measured_task = task

    # ---------------------------------------------------------------- Fisher
    def start_measuring(self, reduction: str = "mean") -> None:
        """Accumulate per-sample Fisher of live slots and the trial slot in every following backward.

        reduction: how the training loss reduces over the batch ("mean" or "sum"): the backward sees the
        batch-loss gradient, and per-sample gradients are N x (mean) or 1 x (sum) its slices.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self._per_sample_reduction = reduction
        self._measured_task = None
        self._fisher_probe = torch.zeros(statistics_shape(self.capacity), device=self.lora_A.device,
                                         dtype=fisher_dtype(self.lora_A.dtype), requires_grad=True)

    def stop_measuring(self) -> None:
        self._fisher_probe = None

    def reset_measuring(self) -> None:
        """Discards the statistics accumulated so far and keeps measuring (no-op when not measuring). After
        a growth past capacity the probe, whose width follows the capacity, is replaced."""
        probe = self._fisher_probe
        if probe is None:
            return
        if probe.shape != statistics_shape(self.capacity):
            self.start_measuring(self._per_sample_reduction)
        else:
            probe.grad = None

    def fisher_statistics(self) -> torch.Tensor:
        """(3, capacity + 1) sums of squared per-sample gradients, in the layout of fisher_stats.py."""
        if self._fisher_probe is None:
            raise RuntimeError(f"{self.selora_name} is not measuring Fisher: call start_measuring() first")
        grad = self._fisher_probe.grad
        return grad.detach().clone() if grad is not None else torch.zeros_like(self._fisher_probe.detach())

    def fisher_scores(self, statistics: Optional[torch.Tensor] = None) -> FisherScores:
        """FI-Score of the module and of its expansion by the trial slot, and FI-Ratio.

        Raises ValueError when inputs holding inf/NaN reached the module while it was measuring."""
        stats = self.fisher_statistics() if statistics is None else statistics
        live, trial, samples, nonfinite = statistics_summary(stats, self.rank).tolist()
        raise_on_nonfinite_inputs([self.selora_name], [nonfinite])
        return fi_scores(live, trial, samples)

    # ---------------------------------------------------------------- merging
    def live_factors(self, dtype: Optional[torch.dtype] = None):
        """(A[:r], s B[:, :r]) in `dtype` (default the adapter's): the module as a plain LoRA of rank r and
        scale 1 (what peft/diffusers LoRA files hold; s is multiplied in float64, so a power-of-two s folds
        exactly)."""
        r, dtype = self.rank, dtype or self.lora_B.dtype
        lora_b = (self.lora_B[:, :r].detach().double() * self.scale).to(dtype)
        return self.lora_A[:r].detach().to(dtype, copy=True), lora_b

    def merged_weight(self) -> torch.Tensor:
        """W0 + s B A over the live slots, in the base dtype (for merging into the base for inference)."""
        r = self.rank
        delta = self.scale * (self.lora_B[:, :r].double() @ self.lora_A[:r].double())
        return (self.weight.double() + delta).to(self.weight.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the adapter merged into its weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # ---------------------------------------------------------------- state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key_a, key_b, key_rank = prefix + "lora_A", prefix + "lora_B", prefix + "live_rank"
        if key_a in state_dict and key_b in state_dict and key_rank in state_dict:
            saved_a, saved_b = state_dict[key_a], state_dict[key_b]
            saved_rank = int(state_dict[key_rank])
            check_saved_adapter(self.selora_name, saved_a, saved_b, saved_rank,
                                self.in_features, self.out_features)
            if saved_a.shape[0] != self.capacity:
                self._reallocate_capacity(saved_a.shape[0])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._rank = int(self.live_rank)
        # alpha_over_r: B was rescaled at every growth, so the scale must follow the loaded rank
        self.scale = self.alpha / (self._rank if self.scaling == "alpha_over_r" else self.r_init)

    def _reallocate_capacity(self, capacity: int) -> None:
        # set_ (as growth does), not .data =: autograd's gradient accumulator of a Parameter that
        # DistributedDataParallel holds keeps the shape it saw, unless the tensor itself is reset
        with torch.no_grad():
            self.lora_A.set_(self.lora_A.new_zeros(capacity, self.in_features))
            self.lora_B.set_(self.lora_B.new_zeros(self.out_features, capacity))
        self.lora_A.grad = self.lora_B.grad = None  # of the old shape (load before building the optimizer)
        self._fisher_probe = None
        self.reallocated = True


def check_saved_adapter(name, lora_a, lora_b, rank, in_features, out_features) -> None:
    """Raises ValueError when a saved adapter's rank disagrees with its tensors or the module."""
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != in_features \
            or lora_b.shape[0] != out_features or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"{name}: saved adapter shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not "
                         f"fit a module with in={in_features}, out={out_features}")
    capacity = lora_a.shape[0]
    if not 1 <= rank <= capacity:
        raise ValueError(f"{name}: saved rank {rank} is outside 1..{capacity} (the saved capacity)")
    if bool(lora_a[rank:].any()) or bool(lora_b[:, rank:].any()):
        raise ValueError(f"{name}: saved rank is {rank} but slots beyond it are non-zero: the state dict's "
                         f"ranks disagree with its adapter tensors")


def selora_modules(model_or_modules) -> Dict[str, SeLoRALinear]:
    """Name -> SeLoRALinear of a model, a module, or a list/dict of them (names: `selora_name`)."""
    if isinstance(model_or_modules, SeLoRALinear):
        return {model_or_modules.selora_name: model_or_modules}
    if isinstance(model_or_modules, nn.Module):
        return {m.selora_name: m for m in model_or_modules.modules() if isinstance(m, SeLoRALinear)}
    items = list(model_or_modules.values()) if isinstance(model_or_modules, dict) else list(model_or_modules)
    found: Dict[str, SeLoRALinear] = {}
    for item in items:
        for name, module in selora_modules(item).items():
            if name in found and found[name] is not module:
                raise ValueError(f"two different SeLoRA modules are both named {name!r}: inject each model "
                                 f"with its own prefix (e.g. 'unet', 'text_encoder')")
            found[name] = module
    return found
