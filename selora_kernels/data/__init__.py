"""Data shared by training and evaluation: image-caption records and their preprocessing (records), the
in-memory synthetic X-ray set (synthetic), dataset names -> splits -> datasets (datasets), the tiny offline
Stable Diffusion pipeline (tiny_pipeline) and per-item seeds (seeds)."""
