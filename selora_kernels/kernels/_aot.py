"""Ahead-of-time compile specs of the launch table, for `tools/static_check_triton.py` (nothing else imports it).

`aot_spec(config)` returns what `triton.compile(ASTSource(fn, signature, constexprs, attrs))` needs to build
the variant a launcher would launch for `config` on contiguous row-major tensors. Two calibration configs
that are never launched show that each rule of the static check fires.
"""
from __future__ import annotations

from typing import Dict

from . import launch_table, selora_linear_backward, selora_linear_forward
from .launch_table import Blocks, LaunchConfig

_KERNEL_MODULES = {"selora_linear_forward": selora_linear_forward, "selora_linear_backward": selora_linear_backward}


def aot_signature(arg_names, pointer_types: Dict[str, str], constexprs: Dict[str, object],
                  float_args=("scale",), not_divisible=()):
    """Signature and attrs for `triton.compile(ASTSource(fn, signature, constexprs, attrs))`.

    Mirrors what the JIT sees on contiguous inputs: pointers 16-byte aligned and strides 16-divisible
    (the callers put the unit strides into `constexprs`, as the JIT specialises a stride of 1). Sizes are
    left unspecialised, the conservative case (all boundary masks kept)."""
    signature, attrs = {}, {}
    for index, arg in enumerate(arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointer_types:
            signature[arg] = "*" + pointer_types[arg]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg in float_args:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg.startswith("stride") and arg not in not_divisible:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def jit_function(kernel: str):
    """The @triton.jit function behind a launch-table kernel name."""
    module_name, function_name, _ = launch_table.KERNELS[kernel]
    return getattr(_KERNEL_MODULES[module_name], function_name)


def _forward_spec(config: LaunchConfig):
    # the dtype names of the launch table are Triton's pointer element types
    dtype = config.dtype
    flags = dict(config.flags)
    b = config.blocks
    fn = jit_function(config.kernel)
    # x (M,in) s=(in,1), W0^T view strides (1,in), A^T view (1,in), B^T view (1,cap)
    keep = bool(flags.get("KEEP", False))  # a training forward keeping U
    constexprs = dict(HAS_BIAS=bool(flags.get("HAS_BIAS", True)), MASK_LIVE=keep, EMIT_LOW_RANK=keep,
                      HAS_TRIAL=bool(flags.get("TRIAL", False)),
                      R_PAD=config.r_pad, BLOCK_M=b.block_m, BLOCK_N=b.block_n, BLOCK_K=b.block_k,
                      GROUP_M=launch_table.GROUP_M, DOT_PRECISION=flags.get("DOT_PRECISION", "tf32"),
                      stride_xk=1, stride_on=1, stride_wk=1, stride_rk=1, stride_er=1)
    pointer_types = {"x_ptr": dtype, "wt_ptr": dtype, "bias_ptr": dtype, "rank_in_ptr": dtype,
                     "rank_out_ptr": dtype, "live_rank_ptr": "i64", "low_rank_ptr": "fp32", "out_ptr": dtype,
                     "trial_ptr": dtype, "nonfinite_ptr": "fp32"}
    signature, attrs = aot_signature(fn.arg_names, pointer_types, constexprs)
    return fn, signature, constexprs, attrs


def _backward_spec(config: LaunchConfig):
    dtype = config.dtype
    flags = dict(config.flags)
    b = config.blocks
    precision = flags.get("DOT_PRECISION", "tf32")
    fn = jit_function(config.kernel)
    if config.kernel == "shrink":
        # operand "A": U = x A_ext^T (A rows contiguous); operand "B": P = dy B (B columns strided)
        unit_stride = dict(stride_sd=1) if flags["OPERAND"] == "A" else dict(stride_sr=1)
        constexprs = dict(HAS_TRIAL=bool(flags["HAS_TRIAL"]), EMIT_RANK_PARTIAL=flags["OPERAND"] == "B",
                          R_PAD=config.r_pad, BLOCK_M=b.block_m, BLOCK_K=b.block_k, DOT_PRECISION=precision,
                          stride_xd=1, **unit_stride)
        pointers = {"x_ptr": dtype, "slot_rows_ptr": dtype, "trial_row_ptr": dtype, "live_rank_ptr": "i64",
                    "out_ptr": "fp32", "nonfinite_ptr": "fp32", "u_ptr": "fp32", "partial_ptr": "fp32"}
        floats = ()
    elif config.kernel == "grad_x":
        # dy (M,out) s=(out,1), W0 (out,in) s=(in,1), B (out,cap) s=(cap,1), A (cap,in) s=(in,1), x, dx rows
        constexprs = dict(GROUPED=bool(flags["GROUPED"]), R_PAD=config.r_pad, BLOCK_M=b.block_m,
                          BLOCK_N=b.block_n, BLOCK_K=b.block_k, DOT_PRECISION=precision,
                          stride_yo=1, stride_wi=1, stride_br=1, stride_ai=1, stride_xi=1, stride_di=1)
        pointers = {"dy_ptr": dtype, "w_ptr": dtype, "b_ptr": dtype, "a_ptr": dtype, "live_rank_ptr": "i64",
                    "u_ptr": "fp32", "x_ptr": dtype, "dx_ptr": dtype, "partial_ptr": "fp32"}
        floats = ("scale",)
    elif config.kernel == "segment_reduce":
        constexprs = dict(R_PAD=config.r_pad, BLOCK_N=b.block_n, BLOCK_T=b.block_k, DOT_PRECISION=precision,
                          stride_xd=1)
        pointers = {"low_rank_ptr": "fp32", "x_ptr": dtype, "partial_ptr": "fp32"}
        floats = ()
    elif config.kernel == "finalize":
        # grad_a is written row-major, grad_b through its transpose: leave both strides unspecialised
        constexprs = dict(FISHER=bool(flags["FISHER"]), R_PAD=config.r_pad, BLOCK_P=b.block_m, BLOCK_N=b.block_n)
        pointers = {"partial_ptr": "fp32", "grad_a_ptr": dtype, "grad_b_ptr": dtype, "fisher_ptr": "fp32"}
        floats = ("scale", "fisher_factor")
    elif config.kernel == "fisher_collect":
        constexprs = dict(R_PAD=config.r_pad, BLOCK=config.blocks.block_n)
        pointers = {"tiles_a_ptr": "fp32", "tiles_b_ptr": "fp32", "nonfinite_ptr": "fp32", "fisher_ptr": "fp32"}
        floats = ("sample_count",)
    else:
        raise KeyError(f"{config.kernel!r} is not a backward kernel")
    # B's row stride is the capacity (e.g. 15); grad_b is written through its transpose
    not_divisible = ("stride_sd", "stride_bo", "stride_ar", "stride_ad", "stride_br", "stride_bd")
    signature, attrs = aot_signature(fn.arg_names, pointers, constexprs, floats, not_divisible)
    return fn, signature, constexprs, attrs


def aot_spec(config: LaunchConfig):
    """(jit function, signature, constexprs, attrs) to compile `config` ahead of time (static check).

    Mirrors a launch with contiguous row-major tensors: unit strides are specialised to 1 and pointers
    and leading strides are 16-divisible, as Triton's JIT specialises them on such inputs."""
    if config.kernel == "forward":
        return _forward_spec(config)
    return _backward_spec(config)


def naive_forward_config() -> LaunchConfig:
    """A calibration config: BM = BN = 128, BK = 64, rank block 16, 8 warps, 3 stages, bf16.

    A naive fused forward at these tile sizes has been measured at 255 registers + 208 (sm_90) / 168 (sm_80)
    B of stack; this library's forward kernel at the same tile sizes compiles without spilling (the check
    reports its numbers). Never launched."""
    return LaunchConfig("forward", "bf16", 16, Blocks(128, 128, 64, 8, 3), "naive",
                        (("DOT_PRECISION", "tf32"), ("HAS_BIAS", True)))


def spilling_forward_config() -> LaunchConfig:
    """A forward config known to spill on sm_80 and sm_90 (128 x 128 tile on 4 warps, R_PAD 32, bf16):
    the calibration that proves the static check detects spills. Never launched."""
    return LaunchConfig("forward", "bf16", 32, Blocks(128, 128, 64, 4, 3), "calibration",
                        (("DOT_PRECISION", "tf32"), ("HAS_BIAS", True)))
