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


def small_run(folder, out, interval: int, **overrides):
    """FinetuneOptions of a small run: 8 synthetic images -> 6 train, batch 2 -> 3 steps an epoch; SeLoRA
    tests every `interval` steps."""
    from selora_kernels.config import SeLoRAConfig
    from selora_kernels.experiments.finetune import FinetuneOptions  # heavy: only the training tests need it

    values = dict(output_dir=str(out), pretrained=str(folder), dataset="synthetic", synthetic_count=8,
                  resolution=32, epochs=2, batch_size=2, selora=SeLoRAConfig(interval=interval, threshold=1.0),
                  seed=0, progress=False)
    values.update(overrides)
    return FinetuneOptions(**values)


def write_iu_xray(root, n_reports=30, images_per_report=2, write_image=None):
    """A fake IU X-Ray folder: every report has `images_per_report` frontal images (and one lateral);
    write_image(path, index): also write the frontal image files."""
    import csv

    images = root / "images" / "images_normalized"
    images.mkdir(parents=True)
    with open(root / "indiana_reports.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uid", "MeSH", "findings", "impression"])
        writer.writerows([str(u), "x", f"findings of report {u}", "ok"] for u in range(n_reports))
    with open(root / "indiana_projections.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uid", "filename", "projection"])
        for u in range(n_reports):
            writer.writerows([str(u), f"{u}_f{k}.png", "Frontal"] for k in range(images_per_report))
            writer.writerow([str(u), f"{u}_l.png", "Lateral"])
    if write_image is not None:
        for u in range(n_reports):
            for k in range(images_per_report):
                write_image(images / f"{u}_f{k}.png", u * images_per_report + k)
