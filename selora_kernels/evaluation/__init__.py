"""Evaluation: image generation (generation), FID-64/192/2048 + CLIP score (metrics), rank heatmaps (heatmaps)
and the comparison report (report). It reads data from selora_kernels.data and nothing from training."""
