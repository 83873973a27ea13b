"""Static check of the Triton kernels (docs/verification.md#static-check-ahead-of-time-compile-for-sm_80-and-sm_90):
every launch the launchers make (SD 1.5 shapes and the kernel tests, with Triton's own specialisation of
sizes and strides) compiles for sm_80 and sm_90 without spills, within the shared-memory limit, and on
tensor cores where it multiplies matrices.

Needs triton (with its bundled ptxas/cuobjdump/nvdisasm) but no GPU. The full check runs
`tools/static_check_triton.py` in a subprocess (2 worker processes; ~1-3 minutes on 2 cores, much less
with a warm Triton cache); the calibration tests compile a few configs in-process to show that each rule
of the check fires on a config that breaks it.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "static_check_triton.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _tool():
    spec = importlib.util.spec_from_file_location("static_check_triton", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_launch_config_passes_the_static_check(tmp_path):
    from selora_kernels.kernels import launch_table

    report_path = tmp_path / "static_triton.json"
    result = subprocess.run([sys.executable, str(TOOL), "--jobs", "2", "--quiet", "--json", str(report_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(result.stdout[-5000:])
    report = json.loads(report_path.read_text())
    failing = [f"{r['config']} {r['arch']}: {r['problems']}" for r in report["records"] if r["problems"]]
    assert not failing, "static check failures:\n" + "\n".join(failing)
    assert result.returncode == 0, result.stderr[-3000:]
    table = {config.name for config in launch_table.all_launch_configs()}
    assert report["records"] and all(r["table_config"] in table for r in report["records"])
    assert report["versions"]["triton"] and report["versions"]["torch"]
    records = report["records"]
    # compiled as real launches are: the SD bf16 forward (contiguous, sizes % 16) is pipelined (num_stages - 1 tiles in flight)
    sd_forward = [r for r in records if r["table_config"].startswith("forward[bf16,R16,large") and r["arch"] == "sm_90"
                  and any(o.startswith("sd:unet_l1_attn_320") for o in r["origins"])]
    assert sd_forward and all(r["specialised"].get("inner") == "16" and r["specialised"].get("stride_xk") == "1"
                              for r in sd_forward)
    blocks = launch_table.blocks_for("forward", "bf16", rows=4096)
    stage_bytes = (blocks.block_m + blocks.block_n) * blocks.block_k * 2  # one x tile + one W0 tile, bf16
    assert max(r["shared_bytes"] for r in sd_forward) >= (blocks.num_stages - 1) * stage_bytes
    # B's column stride is the capacity (15 or 31): P = dy B's shrink never gets it as 16-divisible
    shrink_b = [r for r in records if r["kernel"] == "shrink" and r["flags"].get("OPERAND") == "B"
                and all(o.startswith("sd:") for o in r["origins"])]
    assert shrink_b and all(r["specialised"].get("stride_sd") != "16" for r in shrink_b)
    for record in report["records"]:
        assert record["stack_bytes"] == 0 and record["local_bytes"] == 0
        if record["expects_tensor_cores"]:
            assert record["tensor_core_count"] > 0, record["config"]


def test_calibration_spilling_config_is_flagged():
    """A forward config known to spill (128 x 128 tile on 4 warps, R_PAD 32): the check must say so."""
    from selora_kernels.kernels import _aot

    tool = _tool()
    for arch in (80, 90):
        record = tool.compile_and_inspect(_aot.spilling_forward_config(), arch)
        assert any(p.startswith("spill") for p in record["problems"]), record
        assert record["stack_bytes"] > 0


def test_calibration_naive_config_is_reported():
    """A naive fused forward at these tile sizes (BM = BN = 128, BK = 64, rank block 16, 8 warps, 3 stages, bf16) has
    been measured at 255 registers and 208 B (sm_90) / 168 B (sm_80) of stack for its kernel. This library's
    forward at the same tile sizes is a different kernel; the check reports its numbers and flags a spill if
    there is one."""
    from selora_kernels.kernels import _aot

    tool = _tool()
    for arch in (80, 90):
        record = tool.compile_and_inspect(_aot.naive_forward_config(), arch)
        print(arch, record["registers"], record["stack_bytes"], record["problems"])
        assert "registers" in record, record["problems"]
        spilled = record["stack_bytes"] > 0 or record["local_bytes"] > 0
        assert spilled == any(p.startswith("spill") for p in record["problems"])


def test_calibration_shared_memory_and_tensor_core_rules():
    from selora_kernels.kernels.launch_table import Blocks, LaunchConfig, blocks_for

    tool = _tool()
    # fp32 128 x 256 x 64 tiles in 4 stages need ~400 KB of shared memory: over both limits.
    too_big = LaunchConfig("forward", "fp32", 16, Blocks(128, 256, 64, 8, 4), "calibration",
                           (("DOT_PRECISION", "tf32"), ("HAS_BIAS", True)))
    record = tool.compile_and_inspect(too_big, 90)
    assert any("shared memory" in p for p in record["problems"]), record
    # IEEE fp32 dots have no tensor-core path: zero HMMA/HGMMA, and the rule knows to expect none.
    ieee = LaunchConfig("segment_reduce", "fp32", 16, blocks_for("segment_reduce", "fp32"), "any",
                        (("DOT_PRECISION", "ieee"),))
    record = tool.compile_and_inspect(ieee, 80)
    assert record["tensor_core_count"] == 0 and not record["expects_tensor_cores"] and not record["problems"]
    tf32 = LaunchConfig("segment_reduce", "fp32", 16, blocks_for("segment_reduce", "fp32"), "any",
                        (("DOT_PRECISION", "tf32"),))
    record = tool.compile_and_inspect(tf32, 80)
    assert record["tensor_core_count"] > 0 and record["expects_tensor_cores"]
