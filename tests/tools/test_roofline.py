"""bench/roofline.py: the floors reproduce the hand-derived numbers of
docs/kernel_design.md#traffic-in-activation-units, and its kernel lists match what our
launchers really launch (counted here with the Triton kernels replaced by counters: nothing runs)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import roofline
from bench.sd_shapes import GPU_SHAPES

REPO_ROOT = Path(__file__).resolve().parents[2]

HAVE_TRITON = importlib.util.find_spec("triton") is not None
L1 = roofline.Layer(rows=32768, d_in=320, d_out=320, rank=4, capacity=15, dtype="bf16", samples=8)


def _us(estimate, launch_us=0.0):
    return estimate.summary(roofline.H100, launch_us=launch_us)["estimate_us"]


def test_floors_reproduce_hand_derived_numbers():
    # derived by hand at 800 TFLOP/s (docs/kernel_design.md#traffic-in-activation-units); 798 here:
    # compute-bound rows within 0.3%
    assert _us(roofline.frozen(L1, "fwd")) == pytest.approx(14.0, abs=0.1)
    assert _us(roofline.lora_chain(L1, "fwd")) == pytest.approx(63.2, rel=0.01)  # peft, 5 kernels
    assert _us(roofline.frozen(L1, "fwd_bwd")) == pytest.approx(28.1, rel=0.01)
    assert _us(roofline.lora_chain(L1, "fwd_bwd")) == pytest.approx(140.5, rel=0.01)
    ff = roofline.Layer(32768, 320, 2560, 4, 15, "bf16", 8)
    assert _us(roofline.frozen(ff, "fwd")) == pytest.approx(67.1, rel=0.005)
    assert roofline.frozen(ff, "fwd").summary(roofline.H100)["bound"] == "compute"
    assert roofline.frozen(L1, "fwd").summary(roofline.H100, launch_us=0)["bound"] == "memory"


def test_fused_forward_reads_x_once():
    """Memory-bound level 1: the fused forward moves what the frozen layer moves, plus the adapter."""
    fused = roofline.Estimate(roofline.ours_fused_forward(L1)).summary(roofline.H100, launch_us=0)
    frozen = roofline.frozen(L1, "fwd").summary(roofline.H100, launch_us=0)
    assert fused["bound"] == "memory" and len(roofline.ours_fused_forward(L1)) == 1
    assert fused["bytes"] - frozen["bytes"] == 2 * 16 * (320 + 320)  # A and B capacity blocks (R_PAD 16)
    assert fused["floor_us"] == pytest.approx(frozen["floor_us"], rel=0.01)


def test_h200_is_only_faster_where_memory_bound():
    frozen = roofline.frozen(L1, "fwd")
    assert frozen.summary(roofline.H200, launch_us=0)["floor_us"] == pytest.approx(
        frozen.summary(roofline.H100, launch_us=0)["floor_us"] * 3.0 / 4.3, rel=1e-9)
    assert roofline.ceilings_for("NVIDIA H200") is roofline.H200
    assert roofline.ceilings_for("NVIDIA H100 80GB HBM3") is roofline.H100


@pytest.mark.skipif(not HAVE_TRITON, reason="the dispatch rules need triton importable")
def test_case_estimates_follow_the_dispatch_and_name_targets():
    shape = GPU_SHAPES[0]._asdict()
    params = {"shape": shape, "rank": 4, "capacity": 15, "dtype": "bf16", "mode": "fwd", "device": "cuda"}
    case = roofline.case_estimate("selora_linear", params, "NVIDIA H100 80GB HBM3")
    assert case["forward_path"] == "fused" and case["ceilings"] == "H100 SXM"
    assert set(case["predicted_targets"]) == {"fwd_within_1.15x_of_frozen", "fwd_2x_faster_than_peft_at_64x64"}
    assert case["predicted_targets"]["fwd_2x_faster_than_peft_at_64x64"] > 2
    fisher = roofline.case_estimate("fisher", {**params, "mode": "fwd_bwd_fisher"}, "NVIDIA H200")
    assert fisher["ceilings"] == "H200" and fisher["increment_us"] >= 0
    assert roofline.case_estimate("growth", params, "NVIDIA H100") is None
    table = roofline.prediction_table()
    assert table.count("\n") == 2 + 4 * len(GPU_SHAPES) - 1


# ------------------------------------------------------------------- the model vs the real launch plan
_NOT_LAUNCHES = {"empty", "empty_strided", "view", "reshape", "_reshape_alias", "as_strided", "t", "transpose",
                 "slice", "select", "detach", "alias", "expand", "unsqueeze", "squeeze", "lift_fresh",
                 "_unsafe_view", "new_empty", "new_empty_strided"}


class _CountDeviceOps(TorchDispatchMode):
    """Counts torch ops that launch work (allocation and views excluded)."""

    def __init__(self):
        super().__init__()
        self.ops, self.allocations = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NOT_LAUNCHES:
            self.ops.append(name)
        self.allocations += name in ("empty", "zeros", "new_empty")
        return func(*args, **(kwargs or {}))


class _CountingKernel:
    """Stands in for a Triton kernel: `kernel[grid](...)` is recorded, not run."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self.name)


def _count_launches(monkeypatch, fn, *args):
    from selora_kernels.kernels import selora_linear_backward, selora_linear_forward

    launches = []
    for module in (selora_linear_forward, selora_linear_backward):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _CountingKernel(name, launches))
    with _CountDeviceOps() as counter:
        fn(*args)
    return launches, counter.ops, counter.allocations


@pytest.mark.skipif(not HAVE_TRITON, reason="the launchers import triton")
@pytest.mark.parametrize("kept", [False, True], ids=["own_u", "kept_u"])
@pytest.mark.parametrize("measuring", [False, True], ids=["plain", "measuring"])
def test_backward_model_counts_the_launches_the_launcher_makes(monkeypatch, measuring, kept):
    from selora_kernels.kernels.selora_linear_backward import selora_linear_backward_triton
    from selora_kernels.kernels.selora_linear_forward import selora_linear_forward_triton

    layer = roofline.Layer(rows=4 * 77, d_in=48, d_out=40, rank=3, capacity=15, dtype="fp16", samples=4)
    t = dict(dtype=torch.float16)
    x, weight = torch.zeros(layer.rows, layer.d_in, **t), torch.zeros(layer.d_out, layer.d_in, **t)
    lora_a, lora_b = torch.zeros(layer.capacity, layer.d_in, **t), torch.zeros(layer.d_out, layer.capacity, **t)
    trial, live_rank = torch.zeros(layer.d_in, **t), torch.tensor(layer.rank)
    kept_tensors, kept_holder = None, []
    if kept:  # what the fused training forward keeps (one launch, counted by the forward's model)
        keep = (live_rank, trial) if measuring else (live_rank,)
        forward_launches, _, _ = _count_launches(
            monkeypatch, lambda: kept_holder.append(selora_linear_forward_triton(
                x, weight, None, lora_a, lora_b, 0.5, keep=keep)[1]))
        assert forward_launches == ["_fused_lowrank_matmul_kernel"]
        kept_tensors = kept_holder[0]
    args = (torch.zeros(layer.rows, layer.d_out, **t), x, weight, lora_a, lora_b, trial, live_rank, 0.5,
            layer.samples, 4.0, measuring, True, kept_tensors)
    kernels, ops, allocations = _count_launches(monkeypatch, selora_linear_backward_triton, *args)
    modelled = roofline.ours_fused_backward(layer, measuring, kept=kept)
    assert len(kernels) + len(ops) == len(modelled), (kernels, ops, [k.name for k in modelled])
    assert allocations == 5  # the four outputs and one workspace for every fp32 scratch buffer
    # no fill launch for the statistics: the collect kernel writes them measuring, the finalize zeroes them
    # otherwise. grad_x emits dA's and dB's pieces (no reduction launch of their own) and one finalize sums
    # both: 2 launches after a forward that kept U, 3 measuring (the collect), one more (the shrink)
    # after a forward that kept nothing
    assert ops == [] and len(kernels) == 2 + measuring + (not kept)
    assert kernels.count("_grad_x_reduce_kernel") == kernels.count("_finalize_grad_and_fisher_kernel") == 1
    assert "_segment_reduce_kernel" not in kernels
    assert ("_fisher_collect_kernel" in kernels) == measuring
    assert ("_shrink_kernel" in kernels) != kept  # a kept U spares the second pass over x


def test_backward_plan_bytes_near_the_physical_floor():
    """Forward + backward of a training step that is not measuring (fused forward keeping U): the bytes the
    launch plan moves within 1.25x of the physical floor (read x, write y; read dy, read x again for dA,
    write dx; W0 once per pass) at every SD 1.5 shape in the benchmarks' dtypes, and x and dy each read once
    by the backward. (fp16 takes 64-row grad_x tiles: twice the pieces, 1.31x on the 616-row text encoder,
    where launches, not bytes, set the time.)"""
    for shape in GPU_SHAPES:
        for dtype in ("bf16", "fp32"):
            layer = roofline.Layer(rows=shape.batch * shape.tokens, d_in=shape.d_in, d_out=shape.d_out, rank=4,
                                   capacity=15, dtype=dtype, samples=shape.batch)
            m, i, o, e = layer.rows, layer.d_in, layer.d_out, layer.e
            floor = e * (3 * m * i + 2 * m * o + 2 * i * o)
            moved = sum(k.bytes for k in roofline.ours(layer, "fwd_bwd", "fused").kernels)
            assert floor <= moved <= 1.25 * floor, (shape.name, dtype, moved / floor)
            backward = roofline.ours_fused_backward(layer, measuring=False, kept=True)
            assert [k.name for k in backward] == ["grad_x (dx, dA and dB pieces)", "finalize dA, dB"]


@pytest.mark.skipif(not HAVE_TRITON, reason="the launchers import triton")
def test_forward_model_counts_one_launch(monkeypatch):
    from selora_kernels.kernels.selora_linear_forward import selora_linear_forward_triton

    t = dict(dtype=torch.bfloat16)
    kernels, ops, _ = _count_launches(monkeypatch, selora_linear_forward_triton, torch.zeros(64, 32, **t),
                                   torch.zeros(24, 32, **t), torch.zeros(24, **t), torch.zeros(15, 32, **t),
                                   torch.zeros(24, 15, **t), 0.5)
    assert kernels == ["_fused_lowrank_matmul_kernel"] and ops == []
    assert len(roofline.ours_fused_forward(L1)) == 1


@pytest.mark.skipif(not HAVE_TRITON, reason="the dispatch rules need triton importable")
def test_bench_tables_render_measured_over_roofline():
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import bench_tables

    params = {"shape": GPU_SHAPES[0]._asdict(), "rank": 4, "capacity": 15, "dtype": "bf16", "mode": "fwd",
              "device": "cuda"}
    estimate = roofline.case_estimate("selora_linear", params, "NVIDIA H100 80GB HBM3")
    estimate["providers"]["ours"]["measured_over_estimate"] = 1.25
    with_floor = {"params": params, "baselines": {"peft": {"ratio": 0.25}}, "path": "fused", "time_ms": 0.02,
                  "targets": [], "roofline": estimate}
    without = {key: value for key, value in with_floor.items() if key != "roofline"}
    rows = bench_tables.linear_table([with_floor, without])
    assert rows[0].endswith("ours / roofline |") and "1.25 (memory)" in rows[2] and rows[3].endswith("| - |")
    assert len({row.count("|") for row in rows}) == 1  # every row has every column
    assert "roofline" not in bench_tables.linear_table([without])[0]


def test_per_gpu_table_and_unknown_gpus():
    assert roofline.ceilings_for("NVIDIA A100-SXM4-40GB") is roofline.A100_40GB
    assert roofline.ceilings_for("NVIDIA A100-SXM4-80GB") is roofline.A100_80GB
    assert roofline.ceilings_for("NVIDIA H100 PCIe") is roofline.H100_PCIE
    assert roofline.ceilings_for("NVIDIA H100 80GB HBM3") is roofline.H100
    with pytest.raises(KeyError):
        roofline.ceilings_for("NVIDIA GeForce RTX 4090")
    # a memory-bound floor scales with the table's bandwidth
    frozen = roofline.frozen(L1, "fwd")
    assert frozen.summary(roofline.A100_40GB, launch_us=0)["floor_us"] == pytest.approx(
        frozen.summary(roofline.H100, launch_us=0)["floor_us"] * 3.0 / 1.555, rel=1e-9)


def test_model_is_labelled_and_never_below_the_floor():
    for mode in ("fwd", "fwd_bwd"):
        est = roofline.ours(L1, mode, "fused", measuring=mode == "fwd_bwd")
        s = est.summary(roofline.H100)
        assert s["estimate_kind"] == "floor" and s["model_kind"] == "model"
        assert s["model_us"] >= s["estimate_us"]
        # launches cost LAUNCH_US each in both
        assert s["estimate_us"] - s["floor_us"] == pytest.approx(s["launches"] * roofline.LAUNCH_US)


def test_wave_quantisation_hi_lo_dot_and_finalize_bytes():
    # 133 programs on 132 SMs: two waves, the model time doubles over one full wave's worth
    full = roofline.Estimate([roofline.Kernel("k", 0.0, 1e9, "bf16", programs=132)])
    partial = roofline.Estimate([roofline.Kernel("k", 0.0, 1e9, "bf16", programs=133)])
    assert partial.model_us(roofline.H100, launch_us=0) == pytest.approx(
        full.model_us(roofline.H100, launch_us=0) * 2 * 132 / 133, rel=1e-9)
    # bf16 expands the rank factor with two dots (hi + lo), fp32 with one
    bf16 = roofline.ours_fused_forward(L1)[0]
    fp32 = roofline.ours_fused_forward(roofline.Layer(32768, 320, 320, 4, 15, "fp32", 8))[0]
    r_pad = 16
    assert bf16.flops - fp32.flops == pytest.approx(2.0 * 32768 * r_pad * 320)
    # the finalize reads each fp32 piece once: 4 bytes per piece, plus both gradients written (and, when not
    # measuring, the zeroed statistics); grad_x writes the same pieces
    kernels = {k.name: k for k in roofline.ours_fused_backward(L1, measuring=False, kept=True)}
    grad_x, finalize = kernels["grad_x (dx, dA and dB pieces)"], kernels["finalize dA, dB"]
    piece_bytes = grad_x.bytes - L1.e * (L1.rows * (L1.d_out + 2 * L1.d_in) + L1.d_in * L1.d_out
                                         + r_pad * (L1.d_in + L1.d_out)) - 4 * L1.rows * r_pad
    # 256 row tiles of 128 rows, 5 column tiles, two waves of 132 SMs: groups of 4 tiles, 64 pieces
    assert piece_bytes == 4 * 64 * r_pad * (L1.d_in + L1.d_out)
    assert finalize.bytes == pytest.approx(piece_bytes + L1.e * (r_pad * (L1.d_in + L1.d_out)
                                                                 + 3 * (L1.capacity + 1)))
