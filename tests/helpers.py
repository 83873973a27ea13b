"""Shared test helpers: float64 references and per-dtype tolerances (defined once, as Liger does)."""
from __future__ import annotations

import torch

TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}
# The Triton kernel tests measure error relative to the largest reference entry (assert_rel_close in
# selora_linear_cases.py), not elementwise rtol/atol as above: kernels accumulate in fp32 from inputs rounded
# to the dtype; the float64 reference sees the same rounded inputs, so only accumulation and output rounding
# remain.
REL_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FISHER_REL_TOL = {torch.float32: 5e-5, torch.float16: 2e-4, torch.bfloat16: 2e-4}


def fill_live_slots(module, rank: int, generator: torch.Generator) -> None:
    """Sets the module to `rank` live slots with random A rows and random (non-zero) B columns."""
    with torch.no_grad():
        module.lora_A.zero_()
        module.lora_B.zero_()
        module.lora_A[:rank] = torch.randn(rank, module.in_features, generator=generator).to(module.lora_A.dtype)
        module.lora_B[:, :rank] = torch.randn(module.out_features, rank, generator=generator).to(
            module.lora_B.dtype)
    module.set_live_rank(rank)


def assert_close(actual, expected, dtype, scale=1.0):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * scale)


def require_backend(backend: str) -> None:
    """Skips an 'extension' case, with the reason, when the compiled extension cannot be loaded."""
    import pytest

    from selora_kernels._extension import extension_status, has_extension

    if backend == "extension" and not has_extension():
        pytest.skip(f"compiled extension unavailable (route: {extension_status()})")


def show_past_capture(request, message: str) -> None:
    """Prints past pytest's output capture, so routes / timings show up even in -q runs."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        print(message)
        return
    with capture.global_and_fixture_disabled():
        print("\n" + message.strip(), flush=True)
