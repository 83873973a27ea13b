"""The paper's comparisons as named presets of `python -m python.compare --preset NAME`.

Each preset sets the dataset, resolution, schedule and methods of one table of the paper (SD 1.5, Adam lr
1e-4, SeLoRA t = 40, 3 evaluation seeds, 50 sampler steps, guidance 7.5). A flag given on the command line
with a value other than its default wins over the preset.
"""
from __future__ import annotations

PAPER_PRESETS = {
    # Tables 1-2: IU X-Ray at 224 px, every method
    "iu_xray_224": dict(dataset="iu_xray", resolution=224, epochs=10, batch_size=8),
    # the 384 x 384 IU X-Ray runs (split 70/10/20, batch 6)
    "iu_xray_384": dict(dataset="iu_xray_384", resolution=384, epochs=10, batch_size=6),
    # Montgomery County CXR: 100 epochs (138 images)
    "montgomery": dict(dataset="montgomery", resolution=224, epochs=100, batch_size=8),
    # appendix C.2 (Table 6): PatchGastricADC22, five subclasses x 1,000 patches, 384 px, batch 6
    "patch_gastric": dict(dataset="patch_gastric", resolution=384, epochs=10, batch_size=6),
    # Table 3: the lambda ablation on IU X-Ray
    "lambda_ablation": dict(dataset="iu_xray", resolution=224, epochs=10, batch_size=8, methods=("selora",),
                            thresholds=(1.0, 1.1, 1.3)),
}


def apply_preset(options, defaults, name: str) -> None:
    """Sets the preset's fields on `options` where they still hold their `defaults` (a dataclass instance)."""
    if name not in PAPER_PRESETS:
        raise ValueError(f"--preset: unknown {name!r}; choose from {sorted(PAPER_PRESETS)}")
    for key, value in PAPER_PRESETS[name].items():
        if getattr(options, key) == getattr(defaults, key):
            setattr(options, key, value)
