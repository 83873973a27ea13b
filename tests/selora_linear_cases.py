"""Shared by the Triton kernel tests (tests/kernels/, tests/ops/test_selora_linear_dispatch.py): inputs,
shapes, the relative check against the float64 reference, and the Triton-interpreter subprocess.

How those files run:
- With a GPU (torch.cuda.is_available()): every test runs compiled, in this process, with fp32, fp16 and
  bf16, plus torch.library.opcheck on the ops with CUDA inputs and a torch.compile(mode="reduce-overhead")
  training step that grows within capacity without recompiling.
- Without a GPU: the kernels run under the Triton interpreter, which must be switched on (TRITON_INTERPRET=1)
  before triton is first imported - and the rest of the suite imports triton without it. So on CPU the
  only kernel test collected in the main process of each file, `test_interpreter_suite`, reruns that file in
  a fresh `python -m pytest` subprocess with TRITON_INTERPRET=1 and SELORA_TRITON_INTERPRETER_CHILD=1, where
  the kernel tests run on CPU tensors with fp32 (IEEE dots) and fp16 only (bf16 would be checked against
  nothing right: the interpreter stores bf16 as 16-bit integers and tl.dot multiplies the raw bits;
  docs/verification.md#triton-interpreter-tests) and small shapes. Run a child directly with
      TRITON_INTERPRET=1 SELORA_TRITON_INTERPRETER_CHILD=1 python -m pytest tests/kernels/test_selora_linear_forward.py
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import FISHER_REL_TOL, REL_TOL  # noqa: F401  (re-exported for the kernel test files)

ON_GPU = torch.cuda.is_available()
IN_CHILD = os.environ.get("SELORA_TRITON_INTERPRETER_CHILD") == "1"
RUN_KERNELS = ON_GPU or IN_CHILD
HAVE_TRITON = importlib.util.find_spec("triton") is not None

needs_kernels = pytest.mark.skipif(not (RUN_KERNELS and HAVE_TRITON),
                                   reason="kernel tests run on a GPU or in the interpreter subprocess")
needs_gpu = pytest.mark.skipif(not (ON_GPU and HAVE_TRITON), reason="needs a CUDA GPU")
drives_interpreter = pytest.mark.skipif(ON_GPU or IN_CHILD or not HAVE_TRITON,
                                        reason="only the CPU parent process drives the interpreter subprocess")

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

# (name, num_samples, tokens per sample, in, out, capacity, live_rank); scaled-down SD shapes and odd sizes.
SHAPES = [
    ("sd_attn_l1_scaled", 2, 16, 40, 40, 15, 4),  # latent tokens, q/k/v 320->320 scaled by 1/8
    ("sd_ff_scaled", 2, 8, 40, 160, 15, 3),  # ff.net.0.proj 320->2560 scaled
    ("text_kv_scaled", 2, 7, 96, 40, 15, 2),  # attn2 k/v 768->320 on 77 text tokens, scaled
    ("odd_sizes", 3, 23, 70, 33, 15, 5),  # nothing a multiple of a block (69 rows, 70 in, 33 out)
    ("rank1", 2, 9, 24, 20, 15, 1),
    ("rank_at_capacity", 2, 9, 24, 20, 15, 15),
    ("capacity31_r_pad32", 2, 10, 36, 28, 31, 31),  # capacity class 32; trial slot is column 31
    ("one_token_per_sample", 6, 1, 20, 24, 15, 3),  # 2-D module input (N, in): one token per sample
    ("tall", 1, 140, 20, 24, 7, 6),  # M > the large-tile threshold (large block table)
]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_case(num_samples, tokens, in_features, out_features, capacity, rank, dtype, seed=0,
              garbage_dead_slots=False):
    """Fresh random inputs rounded to `dtype`. Dead slots are zero, or garbage to test the masking."""
    gen = _generator(seed)
    rows = num_samples * tokens

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)

    x = rand(rows, in_features)
    weight = rand(out_features, in_features, scale=in_features ** -0.5)
    bias = rand(out_features)
    lora_a = rand(capacity, in_features, scale=in_features ** -0.5)
    lora_b = rand(out_features, capacity)
    if not garbage_dead_slots:
        lora_a[rank:] = 0
        lora_b[:, rank:] = 0
    trial_row = rand(in_features, scale=in_features ** -0.5)
    grad_y = rand(rows, out_features)
    live_rank = torch.tensor(rank, dtype=torch.int64, device=DEVICE)
    return dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, trial_row=trial_row,
                grad_y=grad_y, live_rank=live_rank)


def assert_rel_close(actual, expected, tol, what):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= tol * max(scale, 1e-30) or error == 0.0, \
        f"{what}: max error {error:.3e} vs max |ref| {scale:.3e} (rel tol {tol:g})"


def f64(case):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in case.items()}


@pytest.fixture(autouse=True)
def ieee_fp32():
    # "highest" -> IEEE fp32 dots in the kernels (also the only precision the interpreter models).
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def run_interpreter_suite(test_file: str) -> None:
    """Reruns `test_file` in a fresh pytest process with the Triton interpreter on; fails with its output."""
    env = dict(os.environ, TRITON_INTERPRET="1", SELORA_TRITON_INTERPRETER_CHILD="1")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q", "-p",
                             "no:cacheprovider", "-x"], cwd=root, env=env, capture_output=True, text=True,
                            timeout=900)
    print(result.stdout[-6000:])
    assert result.returncode == 0, f"interpreter run failed:\n{result.stdout[-8000:]}\n{result.stderr[-3000:]}"
