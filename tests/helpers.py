"""Shared test helpers: float64 references and per-dtype tolerances (defined once, as Liger does)."""
from __future__ import annotations

import torch

TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def fill_live_slots(module, rank: int, generator: torch.Generator) -> None:
    """Sets the module to `rank` live slots with random A rows and random (non-zero) B columns."""
    with torch.no_grad():
        module.lora_A.zero_()
        module.lora_B.zero_()
        module.lora_A[:rank] = torch.randn(rank, module.in_features, generator=generator).to(module.lora_A.dtype)
        module.lora_B[:, :rank] = torch.randn(module.out_features, rank, generator=generator).to(
            module.lora_B.dtype)
    module.set_live_rank(rank)


def reference_output(module, x: torch.Tensor) -> torch.Tensor:
    """y = x W0^T + b0 + s (x A^T) B^T over the live slots, in float64."""
    r = module.rank
    x64 = x.double()
    y = x64 @ module.weight.double().t()
    if module.bias is not None:
        y = y + module.bias.double()
    return y + module.scale * (x64 @ module.lora_A[:r].double().t()) @ module.lora_B[:, :r].double().t()


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
