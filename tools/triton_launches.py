"""The Triton launches the SeLoRA launchers really make, with the specialisation Triton's JIT gives each one.

`tools/static_check_triton.py` compiles these instead of hand-written signatures: sizes and strides that
are multiples of 16 (or equal to 1) change the compiled code - vectorised loads, whether the main loop is
pipelined, whether a stride multiply disappears - so a check that leaves them unspecialised compiles
binaries that never run.

How: the launchers of `selora_kernels.kernels` run unchanged, with each `@triton.jit` kernel swapped for a
recorder that keeps the arguments instead of launching. Large (Stable Diffusion) shapes use meta tensors
(no memory; a pointer is given the alignment of a caching-allocator block plus the view's offset), the
kernel tests' shapes use the tests' own CPU tensors. Each recorded call then goes through Triton's own
binder (`create_function_from_signature` + `JITFunction._pack_args`, what `JITFunction.run` does) for a
`GPUTarget`, which needs no GPU.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]

# SMs of the GPU each target stands for (A100 for sm_80, H100 SXM / H200 for sm_90): the backward sizes its
# segment chunks by the SM count, and the chunk count is a specialised integer (== 1 or not).
MULTIPROCESSORS = {80: 108, 90: 132}
SD_BATCH = 8
# Stable Diffusion 1.5 linear layers the adapters wrap: (name, tokens per sample, in, out)
SD_LAYERS = (
    ("unet_l1_attn_320", 4096, 320, 320),
    ("unet_l2_attn_640", 1024, 640, 640),
    ("unet_l3_attn_1280", 256, 1280, 1280),
    ("unet_mid_attn_1280", 64, 1280, 1280),
    ("unet_l1_cross_kv_768_320", 77, 768, 320),
    ("unet_l2_cross_kv_768_640", 77, 768, 640),
    ("unet_l3_cross_kv_768_1280", 77, 768, 1280),
    ("unet_l1_ff_proj_320_2560", 4096, 320, 2560),
    ("text_encoder_768", 77, 768, 768),
)
# 15 and 31 make B's column stride odd; 63 has no fused capacity class (the dispatch takes the reference).
SD_CAPACITIES = (15, 31, 63)
CPU_POINTER_BASE = 1 << 32  # meta tensors: a 512-byte aligned base, like a caching-allocator block


@dataclass
class Launch:
    """One recorded kernel call: the jit function, its positional and keyword arguments, and where from."""

    fn: object
    args: tuple
    kwargs: dict
    origin: str


class _Pointer:
    """What Triton's specialiser reads of a tensor: data_ptr() and dtype."""

    def __init__(self, address: int, dtype):
        self.address, self.dtype = address, dtype

    def data_ptr(self) -> int:
        return self.address


def _as_recorded(value):
    import torch

    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return _Pointer(CPU_POINTER_BASE + value.storage_offset() * value.element_size(), value.dtype)
        return _Pointer(value.data_ptr(), value.dtype)
    return value


class _Recorder:
    def __init__(self, fn, sink: List[Launch], origin: List[str]):
        self.fn, self.sink, self.origin = fn, sink, origin

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.sink.append(Launch(self.fn, tuple(_as_recorded(a) for a in args), dict(kwargs),
                                    self.origin[0]))
        return record


@contextlib.contextmanager
def _recording(sink: List[Launch], origin: List[str], multiprocessors: int):
    from selora_kernels.kernels import selora_linear_backward as bwd
    from selora_kernels.kernels import selora_linear_forward as fwd

    names = {fwd: ("_fused_lowrank_matmul_kernel",),
             bwd: ("_shrink_kernel", "_grad_x_reduce_kernel", "_segment_reduce_kernel",
                   "_finalize_grad_and_fisher_kernel",
                   "_fisher_collect_kernel")}
    saved = []
    for module, functions in names.items():
        for name in functions:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _Recorder(getattr(module, name), sink, origin))
    for module in (fwd, bwd):
        saved.append((module, "target_programs", module.target_programs))
        module.target_programs = lambda device: 2 * multiprocessors
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@contextlib.contextmanager
def _fp32_precision(precision: str):
    import torch

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


_PRECISIONS = {"fp32": ("highest", "high"), "fp16": ("highest",), "bf16": ("highest",)}


def _dtype(name):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _fused_forward(capacity, dtype):
    from selora_kernels.ops import cuda_impl

    return cuda_impl._fits_triton(dtype, capacity)


def _fused_backward(capacity, dtype, measuring):
    from selora_kernels.ops import cuda_impl

    return cuda_impl.choose_backward_path(capacity, dtype, measuring) == "fused"


def _sd_launches(origin: List[str]):
    """Forward and backward (measuring or not, with or without grad_x) of every SD layer, batch 8, at each
    capacity and dtype, on contiguous meta tensors as the module passes them."""
    import torch
    from selora_kernels.kernels.launch_table import keeps_trial_column
    from selora_kernels.kernels.selora_linear_backward import selora_linear_backward_triton
    from selora_kernels.kernels.selora_linear_forward import selora_linear_forward_triton
    from selora_kernels.ops.cuda_impl import choose_forward_path

    for name, tokens, d_in, d_out in SD_LAYERS:
        rows = SD_BATCH * tokens
        for dtype_name, precisions in _PRECISIONS.items():
            dtype = _dtype(dtype_name)
            for capacity in SD_CAPACITIES:
                def empty(*shape):
                    return torch.empty(*shape, dtype=dtype, device="meta")

                x, weight, bias = empty(rows, d_in), empty(d_out, d_in), empty(d_out)
                lora_a, lora_b, trial, grad_y = empty(capacity, d_in), empty(d_out, capacity), empty(d_in), \
                    empty(rows, d_out)
                live_rank = torch.empty((), dtype=torch.int64, device="meta")
                for precision in precisions:
                    with _fp32_precision(precision):
                        tag = f"sd:{name}:{dtype_name}:cap{capacity}:{precision}"
                        if _fused_forward(capacity, dtype):
                            origin[0] = tag + ":forward"
                            selora_linear_forward_triton(x, weight, bias, lora_a, lora_b, 0.5)
                        for measuring in (False, True):
                            if not _fused_backward(capacity, dtype, measuring):
                                continue
                            for grad_x in (True, False):
                                origin[0] = f"{tag}:backward:measuring={int(measuring)}:grad_x={int(grad_x)}"
                                selora_linear_backward_triton(grad_y, x, weight, lora_a, lora_b, trial, live_rank,
                                                              0.5, SD_BATCH, float(SD_BATCH), measuring, grad_x)
                            # a training forward on the fused path keeps U (measuring, with the trial column);
                            # its backward then skips the shrink
                            if choose_forward_path(rows, d_in, d_out, capacity, dtype, training=True,
                                                   measuring=measuring) == "fused" \
                                    and (not measuring or keeps_trial_column(dtype_name, rows)):
                                origin[0] = f"{tag}:training_forward:measuring={int(measuring)}"
                                keep = (live_rank, trial) if measuring else (live_rank,)
                                _, kept = selora_linear_forward_triton(x, weight, bias, lora_a, lora_b, 0.5,
                                                                       keep=keep)
                                origin[0] = f"{tag}:backward_kept:measuring={int(measuring)}"
                                selora_linear_backward_triton(grad_y, x, weight, lora_a, lora_b, trial, live_rank,
                                                              0.5, SD_BATCH, float(SD_BATCH), measuring, True,
                                                              kept=kept)


def _test_launches(origin: List[str]):
    """The calls tests/kernels makes (same cases, same tensors), with every dtype the GPU run uses."""
    import torch

    tests_dir = str(ROOT / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    import selora_linear_cases as cases
    from selora_kernels.kernels.launch_table import MAX_CAPACITY_SLOTS, SMALL_M
    from selora_kernels.kernels.selora_linear_backward import selora_linear_backward_triton as backward
    from selora_kernels.kernels.selora_linear_forward import selora_linear_forward_triton as forward

    def run_backward(case, samples, multiplier, measuring, grad_x):
        backward(case["grad_y"], case["x"], case["weight"], case["lora_a"], case["lora_b"], case["trial_row"],
                 case["live_rank"], 0.5, samples, multiplier, measuring, grad_x)

    for dtype_name, precisions in _PRECISIONS.items():
        dtype = _dtype(dtype_name)
        for precision in precisions:
            with _fp32_precision(precision):
                tag = f"test:{dtype_name}:{precision}"
                for name, samples, tokens, d_in, d_out, capacity, rank in cases.SHAPES:
                    case = cases.make_case(samples, tokens, d_in, d_out, capacity, rank, dtype)
                    origin[0] = f"{tag}:{name}:forward"
                    forward(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], 0.75)
                    for measuring in (False, True):
                        origin[0] = f"{tag}:{name}:backward:measuring={int(measuring)}"
                        run_backward(case, samples, float(samples), measuring, True)
                    for measuring in (False, True):
                        if measuring:
                            if capacity + 1 > MAX_CAPACITY_SLOTS or dtype_name == "fp32":
                                continue
                            # as tests/kernels does: enough samples for a measuring forward to keep (> SMALL_M)
                            samples = samples * -(-(SMALL_M + 1) // (samples * tokens))
                            case = cases.make_case(samples, tokens, d_in, d_out, capacity, rank, dtype)
                        origin[0] = f"{tag}:{name}:training_forward:measuring={int(measuring)}"
                        keep = (case["live_rank"], case["trial_row"]) if measuring else (case["live_rank"],)
                        _, kept = forward(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"],
                                          0.5, keep=keep)
                        for grad_x in (True, False):
                            origin[0] = f"{tag}:{name}:backward_kept:measuring={int(measuring)}:grad_x={int(grad_x)}"
                            backward(case["grad_y"], case["x"], case["weight"], case["lora_a"], case["lora_b"],
                                     case["trial_row"], case["live_rank"], 0.5, samples, float(samples), measuring,
                                     grad_x, kept=kept)
                case = cases.make_case(3, 11, 36, 26, 15, 6, dtype, seed=3)
                origin[0] = f"{tag}:forward_strided_no_bias"
                forward(torch.cat([case["x"], case["x"][:, :5]], dim=1)[:, :36], case["weight"].t().contiguous().t(),
                        None, case["lora_a"].t().contiguous().t(),
                        torch.cat([case["lora_b"], case["lora_b"]], dim=1)[:, ::2], 2.0)
                case = cases.make_case(3, 13, 40, 30, 15, 4, dtype, seed=2)
                for measuring in (False, True):
                    origin[0] = f"{tag}:backward_without_grad_x:measuring={int(measuring)}"
                    run_backward(case, 3, 1.0, measuring, False)
                case = cases.make_case(2, 17, 30, 44, 15, 5, dtype, seed=4)
                case["x"] = case["x"].t().contiguous().t()
                case["grad_y"] = torch.cat([case["grad_y"], case["grad_y"]], dim=1)[:, 1::2]
                case["weight"] = case["weight"].t().contiguous().t()
                case["lora_b"] = case["lora_b"].t().contiguous().t()
                origin[0] = f"{tag}:backward_strided"
                run_backward(case, 2, 2.0, True, True)
    with _fp32_precision("highest"):
        for samples, tokens, d_in, d_out, capacity, rank in ((4, 33, 40, 36, 15, 6), (2, 33, 24, 20, 15, 3),
                                                             (2, 2100, 24, 20, 15, 3), (2, 12, 32, 24, 15, 7)):
            case = cases.make_case(samples, tokens, d_in, d_out, capacity, rank, torch.float32)
            for measuring in (False, True):
                origin[0] = f"test:fp32:highest:backward_{samples}x{tokens}x{d_in}x{d_out}:measuring={int(measuring)}"
                forward(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], 0.5)
                run_backward(case, samples, float(samples), measuring, True)


def record_launches(arch: int) -> List[Launch]:
    """Every launch of the SD shapes and of the kernel tests, as the launchers make them on a GPU of `arch`."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("record launches with TRITON_INTERPRET unset: the interpreter's kernels have no "
                           "JIT binder")
    sink: List[Launch] = []
    origin = [""]
    with _recording(sink, origin, MULTIPROCESSORS[arch]):
        _sd_launches(origin)
        _test_launches(origin)
    return sink


def specialise(launch: Launch, arch: int) -> Tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) exactly as `JITFunction.run` builds them for `arch`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def kernel_label(launch: Launch) -> str:
    """The launch-table kernel name of a recorded call."""
    name = launch.fn.fn.__name__
    return {"_fused_lowrank_matmul_kernel": "forward", "_grad_x_reduce_kernel": "grad_x",
            "_shrink_kernel": "shrink", "_segment_reduce_kernel": "segment_reduce",
            "_finalize_grad_and_fisher_kernel": "finalize", "_fisher_collect_kernel": "fisher_collect"}[name]


def specialised_args(fn, signature: dict, attrs: dict) -> Dict[str, str]:
    """Non-constexpr integer arguments by their specialisation: "16" (divisible by 16) or "1" (== 1, a
    constexpr); plain integers are left out."""
    declared = {param.name for param in fn.params if param.is_constexpr}
    result = {}
    for index, name in enumerate(fn.arg_names):
        if signature.get(name) == "constexpr" and name not in declared:
            result[name] = "1"
        elif signature.get(name, "").startswith("i") and attrs.get((index,)):  # [] = not specialised
            result[name] = "16"
    return result
