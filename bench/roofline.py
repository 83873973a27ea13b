"""Roofline floors of the GPU benchmark cases: what no implementation of a provider can beat (model and
reading: docs/kernel_design.md#byte-and-flop-budget-roofline-per-sd-15-shape).

Each provider is written down as the kernels it launches, each with the FLOPs it must do and the fewest
bytes it must move through HBM (every operand read once per kernel, every result written once). A kernel's
floor is max(FLOPs / matrix rate, bytes / bandwidth); a provider's is the sum over its kernels. Launches
are counted separately: with `launch_us` per launch the estimate becomes floor + launches x launch_us,
which is what decides the small layers (text encoder: ~1 us of bytes, a few us per launch).

Our kernels are counted from their real launch plan (kernels/launch_table.py: block tables, capacity class,
chunking of the segment reduction), so a change of block size shows up here. The baselines are counted
from the graphs the benchmarks run (bench_selora_linear.py, bench_selora_linear_fisher.py); peft's forward is
the same 5-kernel chain as `unfused` (dropout 0 is an Identity).

Ceilings: measured on the H100 / H200 machines this project borrows (copy bandwidth, bf16 matrix rate): H100
copy 3.0 TB/s (reads + writes), bf16 matrix product 798 TFLOP/s; H200 4.3 TB/s, 790 TFLOP/s. fp32: ~60 TFLOP/s
on the SIMT units (IEEE, torch's default "highest" precision) and ~380 with TF32 (nominal rates, not
measured). Not measured here: no GPU has been lent to this project; these numbers are predictions, and a GPU
run stores them beside its timings.

Two numbers per provider, labelled: `estimate_us` is a floor (peak rates, bytes once, + launches);
`model_us` a prediction (Triton at TRITON_MATRIX_EFFICIENCY of the matrix rate, wave quantisation of our
kernels' programs, the hi/lo and tf32x3 expand dots, + launches). No L2 term in either.

    python -m bench.roofline            # the prediction table of bench/README.md (H100)
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

if __package__ in (None, ""):  # `python bench/roofline.py` and pytest's rootdir imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selora_kernels.fisher_stats import statistics_width  # noqa: E402
from selora_kernels.kernels import launch_table  # noqa: E402

ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
LAUNCH_US = 4.5  # one eager launch, host side included (CUDA ~4-5 us; Triton's Python launcher is not faster)
# "model" only: a Triton main loop reaches a fraction of cuBLAS's matrix rate (assumed, not measured here)
TRITON_MATRIX_EFFICIENCY = 0.7


@dataclass(frozen=True)
class Ceilings:
    name: str
    bandwidth: float  # bytes/s, reads + writes
    half_flops: float  # bf16 / fp16 dense matrix products
    tf32_flops: float
    fp32_flops: float  # IEEE fp32 on the SIMT units
    multiprocessors: int = 132

    def matrix_rate(self, math_dtype: str, fp32_precision: str = "highest") -> float:
        if math_dtype in ("bf16", "fp16"):
            return self.half_flops
        return self.fp32_flops if fp32_precision == "highest" else self.tf32_flops


# H100 SXM / H200: measured copy bandwidth and bf16 rate (module docstring); the others: datasheet figures
# (A100: HBM 1.555 / 2.039 TB/s, 312 TFLOP/s bf16, 156 TF32, 19.5 fp32; H100 PCIe: 2.0 TB/s, 756 bf16,
# 378 TF32, 51 fp32), not measured.
H100 = Ceilings("H100 SXM", 3.0e12, 798e12, 380e12, 60e12, 132)
H200 = Ceilings("H200", 4.3e12, 790e12, 380e12, 60e12, 132)
H100_PCIE = Ceilings("H100 PCIe", 2.0e12, 756e12, 378e12, 51e12, 114)
A100_40GB = Ceilings("A100 40GB SXM", 1.555e12, 312e12, 156e12, 19.5e12, 108)
A100_80GB = Ceilings("A100 80GB SXM", 2.039e12, 312e12, 156e12, 19.5e12, 108)
GPUS = {c.name: c for c in (A100_40GB, A100_80GB, H100, H100_PCIE, H200)}


def ceilings_for(device_name: str) -> Ceilings:
    """The table entry of a torch.cuda.get_device_name() string; KeyError for a GPU not in the table (a
    wrong GPU's figures would be a wrong prediction, not a conservative one)."""
    name = device_name.upper()
    if "H200" in name:
        return H200
    if "H100" in name:
        return H100_PCIE if "PCIE" in name else H100
    if "A100" in name:
        return A100_40GB if "40GB" in name or "40G" in name else A100_80GB
    raise KeyError(f"no roofline figures for {device_name!r}; known: {sorted(GPUS)}")


@dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    bytes: float
    math_dtype: str  # rate of the FLOPs: "bf16"/"fp16" tensor cores, "fp32" SIMT or TF32
    programs: int = 0  # Triton programs (tiles) of our kernels: wave quantisation in the model; 0 = unknown
    triton: bool = False  # our Triton kernel: the model applies TRITON_MATRIX_EFFICIENCY


@dataclass
class Estimate:
    kernels: List[Kernel] = field(default_factory=list)

    def __iadd__(self, kernels: List[Kernel]) -> "Estimate":
        self.kernels.extend(kernels)
        return self

    def times_us(self, ceilings: Ceilings, fp32_precision: str = "highest") -> Tuple[float, float]:
        """(memory-bound part, compute-bound part) of the floor, in microseconds."""
        memory = compute = 0.0
        for k in self.kernels:
            t_mem = k.bytes / ceilings.bandwidth
            t_flop = k.flops / ceilings.matrix_rate(k.math_dtype, fp32_precision)
            if t_mem >= t_flop:
                memory += t_mem
            else:
                compute += t_flop
        return memory * 1e6, compute * 1e6

    def model_us(self, ceilings: Ceilings, fp32_precision: str = "highest", launch_us: float = LAUNCH_US) -> float:
        """A prediction, not a bound: per kernel max(bytes, FLOPs at Triton's efficiency for ours), stretched
        by wave quantisation (a partial last wave of programs costs a whole wave), plus the launches."""
        total = 0.0
        for k in self.kernels:
            rate = ceilings.matrix_rate(k.math_dtype, fp32_precision)
            if k.triton:
                rate *= TRITON_MATRIX_EFFICIENCY
            t = max(k.bytes / ceilings.bandwidth, k.flops / rate)
            if k.programs:
                waves = k.programs / ceilings.multiprocessors
                t *= math.ceil(waves) / waves
            total += t
        return total * 1e6 + len(self.kernels) * launch_us

    def summary(self, ceilings: Ceilings, fp32_precision: str = "highest", launch_us: float = LAUNCH_US) -> dict:
        memory, compute = self.times_us(ceilings, fp32_precision)
        floor = memory + compute
        launches = len(self.kernels) * launch_us
        bound = "launches" if launches > floor else ("memory" if memory >= compute else "compute")
        # estimate_us is a floor (peak rates, every byte once, no waves) plus launches: nothing runs faster.
        # model_us is the prediction; neither has an L2 term.
        return {"floor_us": floor, "launches": len(self.kernels), "estimate_us": floor + launches,
                "estimate_kind": "floor", "model_us": self.model_us(ceilings, fp32_precision, launch_us),
                "model_kind": "model", "bound": bound, "bytes": sum(k.bytes for k in self.kernels),
                "flops": sum(k.flops for k in self.kernels)}


@dataclass(frozen=True)
class Layer:
    """One benchmark case's layer: M rows (samples x tokens), widths, live rank, capacity, operand dtype."""

    rows: int
    d_in: int
    d_out: int
    rank: int
    capacity: int
    dtype: str
    samples: int = 1

    @property
    def e(self) -> int:
        return ELEMENT_BYTES[self.dtype]


def gemm(name: str, m: int, k: int, n: int, e: int, math_dtype: str, out_e: Optional[int] = None) -> Kernel:
    """(m x k) @ (k x n): both operands read once, the result written once."""
    return Kernel(name, 2.0 * m * k * n, e * (m * k + k * n) + (out_e or e) * m * n, math_dtype)


def linear(m: int, i: int, o: int, e: int, math_dtype: str) -> Kernel:
    """F.linear with a bias: the GEMM with the bias added in its epilogue."""
    k = gemm("linear", m, i, o, e, math_dtype)
    return Kernel(k.name, k.flops, k.bytes + e * o, k.math_dtype)


def elementwise(name: str, read: float, written: float, e: int, out_e: Optional[int] = None) -> Kernel:
    return Kernel(name, 0.0, e * read + (out_e or e) * written, "fp32")


# --- baselines ------------------------------------------------------------------------------------------

def frozen(layer: Layer, mode: str) -> Estimate:
    m, i, o, e, d = layer.rows, layer.d_in, layer.d_out, layer.e, layer.dtype
    est = Estimate([linear(m, i, o, e, d)])
    if mode != "fwd":
        est += [gemm("grad_x", m, o, i, e, d)]
    return est


def lora_chain(layer: Layer, mode: str) -> Estimate:
    """`unfused` and peft: base GEMM, shrink, expand, scale, add; autograd's 7 backward kernels."""
    m, i, o, r, e, d = layer.rows, layer.d_in, layer.d_out, layer.rank, layer.e, layer.dtype
    est = Estimate([linear(m, i, o, e, d), gemm("shrink x A^T", m, i, r, e, d),
                    gemm("expand U B^T", m, r, o, e, d), elementwise("scale", m * o, m * o, e),
                    elementwise("add", 2 * m * o, m * o, e)])
    if mode != "fwd":
        est += [elementwise("scale backward", m * o, m * o, e), gemm("dU = dV B", m, o, r, e, d),
                gemm("dB = dV^T U", o, m, r, e, d), gemm("dX_lora = dU A", m, r, i, e, d),
                gemm("dA = dU^T X", r, m, i, e, d), gemm("dX_base = dY W0", m, o, i, e, d),
                elementwise("dX sum", 2 * m * i, m * i, e)]
    return est


def merged_baseline(layer: Layer, mode: str) -> Estimate:
    """`F.linear(x, W0 + s (B @ A), b0)` as the benchmark writes it: 3 weight kernels, then one GEMM."""
    m, i, o, r, e, d = layer.rows, layer.d_in, layer.d_out, layer.rank, layer.e, layer.dtype
    w = i * o
    est = Estimate([gemm("B @ A", o, r, i, e, d), elementwise("scale", w, w, e), elementwise("W0 +", 2 * w, w, e),
                    linear(m, i, o, e, d)])
    if mode != "fwd":
        est += [gemm("grad_x", m, o, i, e, d), gemm("dW = dY^T X", o, m, i, e, d),
                elementwise("scale backward", w, w, e), gemm("dB = dW A^T", o, i, r, e, d),
                gemm("dA = B^T dW", r, o, i, e, d)]
    return est


# --- ours -----------------------------------------------------------------------------------------------

def ours_fused_forward(layer: Layer, keep: bool = False, multiprocessors: int = 132,
                       measuring: bool = False) -> List[Kernel]:
    """One kernel: x read once, the R_PAD-wide rank dot computed once per program, a program covering a
    group of output-column tiles (launch_table.column_group: at least a wave of programs).
    keep (a training forward): also writes U = x A^T (fp32) for the backward, with the trial column (and
    R_PAD holding it) while measuring."""
    m, i, o, e, d = layer.rows, layer.d_in, layer.d_out, layer.e, layer.dtype
    r_pad = launch_table.r_pad_for(max(layer.capacity + (keep and measuring), 1))
    blocks = launch_table.blocks_for("forward", d, m)
    tiles_m, tiles_n = math.ceil(m / blocks.block_m), math.ceil(o / blocks.block_n)
    groups = math.ceil(tiles_n / launch_table.column_group(tiles_m, tiles_n, multiprocessors))
    flops = 2.0 * m * i * o + 2.0 * m * i * r_pad * groups + _EXPAND_DOTS[d] * 2.0 * m * r_pad * o
    moved = e * (m * i + i * o + r_pad * (i + o) + m * o + o) + (4 * m * r_pad if keep else 0)
    return [Kernel("fused forward", flops, moved, d, tiles_m * groups, True)]


# tensor-core dots of _fp32_rank_dot: bf16 splits the fp32 rank factor into hi + lo (two bf16 dots);
# fp16 runs tf32x3 (three TF32 dots, counted at the half rate: a floor); fp32 one dot
_EXPAND_DOTS = {"bf16": 2, "fp16": 3, "fp32": 1}


def ours_merged_forward(layer: Layer) -> List[Kernel]:
    """ops/cuda_impl.merged_forward: one addmm W0 + s B A (fp32 accumulation, one rounding), one GEMM."""
    m, i, o, r, e, d = layer.rows, layer.d_in, layer.d_out, layer.capacity, layer.e, layer.dtype
    return [Kernel("addmm W0 + s B A", 2.0 * i * o * r, e * (2 * i * o + r * (i + o)), d),
            linear(m, i, o, e, d)]


def ours_fused_backward(layer: Layer, measuring: bool, multiprocessors: int = 132,
                        kept: bool = False) -> List[Kernel]:
    """kernels/selora_linear_backward.py: shrink (U, with the trial column and non-finite counts while
    measuring; skipped when a fused training forward `kept` them), grad_x (dx, plus dA's and dB's pieces per
    group of row tiles), one finalize for both gradients, and the Fisher collect while measuring."""
    m, i, o, e, d = layer.rows, layer.d_in, layer.d_out, layer.e, layer.dtype
    r_pad = launch_table.r_pad_for(statistics_width(layer.capacity, measuring))
    segments = layer.samples if measuring else 1
    blocks = launch_table.blocks_for("grad_x", d, m)
    tiles_in = math.ceil(i / blocks.block_n)
    row_tiles = math.ceil(m / blocks.block_m)
    group, _ = launch_table.grad_x_groups(m, i, d, m // segments, 2 * multiprocessors)
    pieces = math.ceil(row_tiles / group) + segments - 1
    partials = pieces * r_pad * (i + o)  # fp32, dA's then dB's
    kernels = [] if kept else [
        Kernel("shrink U = x A_ext^T", 2.0 * m * i * r_pad, e * (m * i + r_pad * i) + 4 * m * r_pad, d,
               math.ceil(m / launch_table.blocks_for("shrink", d).block_m), True)]
    # P = dy B is recomputed by each column tile (R_PAD / BN of the main loop); the expand, dA's and dB's
    # piece dots run at fp32 precision on the rank factor (_EXPAND_DOTS)
    kernels.append(Kernel(
        "grad_x (dx, dA and dB pieces)",
        2.0 * m * o * i + 2.0 * m * o * r_pad * tiles_in + _EXPAND_DOTS[d] * 2.0 * m * r_pad * (2 * i + o),
        e * (m * o + o * i + r_pad * (i + o) + 2 * m * i) + 4 * m * r_pad + 4 * partials, d,
        math.ceil(row_tiles / group) * tiles_in, True))
    # reads each fp32 piece once (4 B) and writes both gradients in the operand dtype; zeroes the
    # statistics when not measuring (no fill launch either way)
    stats = 3 * (layer.capacity + 1)
    kernels.append(elementwise("finalize dA, dB", partials, r_pad * (i + o) + (0 if measuring else stats), 4, e))
    if measuring:  # _fisher_collect_kernel: per-tile sums of both reductions into the statistics
        tiles = sum(math.ceil(depth / launch_table.blocks_for("finalize", d).block_n) for depth in (i, o))
        kernels.append(elementwise("fisher collect", tiles * r_pad, stats, 4))
    return kernels


def ours(layer: Layer, mode: str, forward_path: str, measuring: bool = False,
         multiprocessors: int = 132) -> Estimate:
    # a fused training forward keeps U for the backward (ops/selora_linear.py); measuring, with the trial
    # column where launch_table.keeps_trial_column (half precision, M > 64)
    kept = mode != "fwd" and forward_path == "fused" and (
        not measuring or launch_table.keeps_trial_column(layer.dtype, layer.rows))
    est = Estimate(ours_fused_forward(layer, kept, multiprocessors, measuring) if forward_path == "fused"
                   else ours_merged_forward(layer))
    if mode != "fwd":
        est += ours_fused_backward(layer, measuring, multiprocessors, kept=kept)
    return est


def dispatched_forward_path(layer: Layer, training: bool = False, measuring: bool = False) -> str:
    """What ops/cuda_impl.choose_forward_path picks for this layer (the rules are pure: no GPU needed);
    training: a training forward; measuring: of a measuring step."""
    from selora_kernels.ops.cuda_impl import choose_forward_path

    import torch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[layer.dtype]
    path = choose_forward_path(layer.rows, layer.d_in, layer.d_out, layer.capacity, dtype, training=training,
                               measuring=measuring)
    return "fused" if path == "reference" else path  # without triton the rules say reference: model fused


# --- Fisher baselines (bench_selora_linear_fisher.py: the Fisher alone, given x and dY) -------------------------------

def vmap_fisher(layer: Layer) -> Estimate:
    """torch.func vmap(grad(<y_i, dY_i>)) over samples w.r.t. (A_ext, B_ext): forward, then the LoRA grads."""
    m, i, o, e, d, n = layer.rows, layer.d_in, layer.d_out, layer.e, layer.dtype, layer.samples
    r = layer.rank + 1
    casts = [elementwise("y.float()", m * o, m * o, e, 4), elementwise("dY.float()", m * o, m * o, e, 4)] \
        if d != "fp32" else []
    est = Estimate([linear(m, i, o, e, d), gemm("shrink", m, i, r, e, d), gemm("expand", m, r, o, e, d),
                    elementwise("scale", m * o, m * o, e), elementwise("add", 2 * m * o, m * o, e)] + casts
                   + [elementwise("y * dY", 2 * m * o, m * o, 4), elementwise("sum", m * o, 0, 4),
                      elementwise("grad of the product", m * o, m * o, 4)])
    if d != "fp32":
        est += [elementwise("grad to dtype", m * o, m * o, 4, e)]
    est += [elementwise("scale backward", m * o, m * o, e),
            Kernel("dB_i = dV_i^T U_i", 2.0 * m * o * r, e * (m * o + m * r + n * o * r), d),
            gemm("dU = dV B", m, o, r, e, d),
            Kernel("dA_i = dU_i^T X_i", 2.0 * m * r * i, e * (m * r + m * i + n * r * i), d),
            elementwise("squares and sums", 2 * n * r * (i + o), 2 * r, 4)]
    return est


def bmm_fisher(layer: Layer) -> Estimate:
    """P = dY B, U = x A^T, per-sample bmm, squares: in fp32 (the benchmark casts to float first)."""
    m, i, o, e, d, n = layer.rows, layer.d_in, layer.d_out, layer.e, layer.dtype, layer.samples
    r = layer.rank + 1
    est = Estimate([elementwise("x.float()", m * i, m * i, e, 4), elementwise("dY.float()", m * o, m * o, e, 4)]
                   if d != "fp32" else [])
    est += [gemm("P = dY B", m, o, r, 4, "fp32"), gemm("U = x A^T", m, i, r, 4, "fp32"),
            Kernel("bmm P_i^T X_i", 2.0 * m * r * i, 4 * (m * r + m * i + n * r * i), "fp32"),
            Kernel("bmm dY_i^T U_i", 2.0 * m * r * o, 4 * (m * r + m * o + n * r * o), "fp32"),
            elementwise("squares and sums", 2 * n * r * (i + o), 2 * r, 4)]
    return est


# --- per benchmark case ---------------------------------------------------------------------------------

def _layer(params: dict) -> Layer:
    shape = params["shape"]
    return Layer(rows=shape["batch"] * shape["tokens"], d_in=shape["d_in"], d_out=shape["d_out"],
                 rank=params["rank"], capacity=params["capacity"], dtype=params["dtype"], samples=shape["batch"])


def linear_case(params: dict, ceilings: Ceilings, fp32_precision: str = "highest",
                launch_us: float = LAUNCH_US) -> dict:
    """Floors of every provider of a bench_selora_linear case, and the predicted value of its targets."""
    layer, mode = _layer(params), params["mode"]
    path = dispatched_forward_path(layer, training=mode != "fwd")  # fwd_bwd: a training step
    providers = {"ours": ours(layer, mode, path, multiprocessors=ceilings.multiprocessors),
                 "ours_fused": ours(layer, mode, "fused", multiprocessors=ceilings.multiprocessors),
                 "ours_merged": ours(layer, mode, "merged", multiprocessors=ceilings.multiprocessors),
                 "frozen": frozen(layer, mode), "unfused": lora_chain(layer, mode), "peft": lora_chain(layer, mode),
                 "merged": merged_baseline(layer, mode)}
    out = {name: est.summary(ceilings, fp32_precision, launch_us) for name, est in providers.items()}
    t = {name: s["estimate_us"] for name, s in out.items()}
    predicted = {}
    if mode == "fwd":
        predicted["fwd_within_1.15x_of_frozen"] = t["ours"] / t["frozen"]
        if params["shape"]["name"].startswith("unet64") and params["rank"] <= 16:
            predicted["fwd_2x_faster_than_peft_at_64x64"] = t["peft"] / t["ours"]
    return {"ceilings": ceilings.name, "fp32_precision": fp32_precision, "launch_us": launch_us,
            "forward_path": path, "providers": out, "predicted_targets": predicted}


def fisher_case(params: dict, ceilings: Ceilings, fp32_precision: str = "highest",
                launch_us: float = LAUNCH_US) -> dict:
    """Floors of a bench_selora_linear_fisher case: ours with and without measuring, vmap and bmm Fisher."""
    layer = _layer(params)
    path = dispatched_forward_path(layer, training=True)
    measuring_path = dispatched_forward_path(layer, training=True, measuring=True)
    sms = ceilings.multiprocessors
    providers = {"ours_fisher": ours(layer, "fwd_bwd", measuring_path, True, sms),
                 "ours_no_fisher": ours(layer, "fwd_bwd", path, False, sms),
                 "vmap_fisher": vmap_fisher(layer), "bmm_fisher": bmm_fisher(layer)}
    out = {name: est.summary(ceilings, fp32_precision, launch_us) for name, est in providers.items()}
    t = {name: s["estimate_us"] for name, s in out.items()}
    increment = t["ours_fisher"] - t["ours_no_fisher"]
    return {"ceilings": ceilings.name, "fp32_precision": fp32_precision, "launch_us": launch_us,
            "forward_path": path, "measuring_forward_path": measuring_path, "providers": out,
            "increment_us": increment,
            "predicted_targets": {
                "fwd_bwd_with_fisher_within_1.10x_without": t["ours_fisher"] / t["ours_no_fisher"],
                "fisher_increment_20x_smaller_than_vmap": t["vmap_fisher"] / increment if increment > 0 else math.inf}}


def case_estimate(op: str, params: dict, device_name: str, fp32_precision: str = "highest") -> Optional[dict]:
    """The roofline record stored with a GPU case (None for ops without a model)."""
    ceilings = ceilings_for(device_name)
    if op == "selora_linear":
        return linear_case(params, ceilings, fp32_precision)
    if op == "fisher":
        return fisher_case(params, ceilings, fp32_precision)
    return None


# --- the README table -----------------------------------------------------------------------------------

def _gpu_params():
    from bench.sd_shapes import GPU_SHAPES
    from selora_kernels.config import default_capacity

    for shape in GPU_SHAPES:
        for dtype, ranks in (("bf16", (1, 4, 16)), ("fp32", (4,))):
            for rank in ranks:  # the benchmarks build their modules with r_init = rank
                yield shape, rank, default_capacity(rank), dtype


def prediction_table(ceilings: Ceilings = H100, launch_us: float = LAUNCH_US) -> str:
    rows = ["| layer | r | dtype | fwd path: inference, training | fwd / frozen | peft fwd / ours | fwd+bwd: ours / frozen | "
            "peft / ours | Fisher: with / without | vmap / increment | bound (ours fwd, fwd+bwd) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape, rank, capacity, dtype in _gpu_params():
        params = {"shape": shape._asdict(), "rank": rank, "capacity": capacity, "dtype": dtype}
        fwd = linear_case({**params, "mode": "fwd"}, ceilings, launch_us=launch_us)
        both = linear_case({**params, "mode": "fwd_bwd"}, ceilings, launch_us=launch_us)
        fisher = fisher_case(params, ceilings, launch_us=launch_us)

        def ratio(case, a, b):
            return case["providers"][a]["estimate_us"] / case["providers"][b]["estimate_us"]

        f = fisher["predicted_targets"]
        rows.append(
            f"| {shape.name} {shape.batch}x{shape.tokens} | {rank} | {dtype} | "
            f"{fwd['forward_path']}, {both['forward_path']} | "
            f"{ratio(fwd, 'ours', 'frozen'):.2f} | {ratio(fwd, 'peft', 'ours'):.1f} | "
            f"{ratio(both, 'ours', 'frozen'):.2f} | {ratio(both, 'peft', 'ours'):.1f} | "
            f"{f['fwd_bwd_with_fisher_within_1.10x_without']:.2f} | "
            f"{f['fisher_increment_20x_smaller_than_vmap']:.1f} | "
            f"{fwd['providers']['ours']['bound']}, {both['providers']['ours']['bound']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    for launch in (0.0, LAUNCH_US):
        print(f"\nH100, {launch:g} us per launch\n")
        print(prediction_table(H100, launch))
