"""Compile-only check of csrc/cuda/*.cu for the real GPU targets (sm_80, sm_90): no GPU needed, only nvcc.

Fails on a compile error or on a kernel with a stack frame (register spill) that is not explicitly allowed
in tools/compile_cuda_sources.py (STACK_ALLOWED). Prints registers / stack / shared memory per kernel.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import show_past_capture

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOL = REPO_ROOT / "tools" / "compile_cuda_sources.py"

_show = show_past_capture



def _load_tool():
    spec = importlib.util.spec_from_file_location("compile_cuda_sources", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def test_resource_usage_parser():
    tool = _load_tool()
    text = """
Resource usage:
 Common:
  GLOBAL:0
 Function _Z3fooPf:
  REG:40 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0
Fatbin elf code:
================
arch = sm_90
 Function _Z3barPf:
  REG:38 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    usages = tool.parse_resource_usage(text)
    assert [(u.name, u.registers, u.stack, u.shared) for u in usages] == [
        ("_Z3fooPf", 40, 8, 0), ("_Z3barPf", 38, 0, 1024)]
    assert usages[1].arch == "90"


def test_cuda_sources_compile_for_sm80_sm90_without_spills(request):
    tool = _load_tool()
    if tool.find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): CUDA sources not compiled")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(TOOL), "--arch", "80", "--arch", "90"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - start
    report = "\n".join(line for line in result.stdout.splitlines() if line.strip())
    _show(request, f"\nnvcc compile check ({elapsed:.0f}s):\n{report}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "REG=" in result.stdout, "no kernel resource usage reported:\n" + result.stdout
