"""Evaluation: image generation (generation), FID-64/192/2048 + CLIP score (metrics), the comparison report
(report) and the one-command comparison (comparison)."""
