"""Scores without downloaded weights: distances in the feature space of the pre-trained base's VAE encoder.

Inception and CLIP need weights this machine cannot download, and randomly initialised stand-ins measure
nothing. The tiny base pipeline's VAE was trained on the generic domain only (never on the phantoms) and is
frozen by every method, so its encoder is one fixed, learned image embedding for all of them:

    feature(image) = VAE encoder posterior mean (C x 8 x 8 at 64 px), average-pooled to C x 4 x 4, flattened

Two numbers per generated set (lower = closer to the real images):
- fd_vae: Frechet distance between the generated and the real feature sets (FID's formula, this space);
- nn_vae: mean over generated images of the Euclidean distance to the nearest real image's features.

`VaeFeatureEvaluator` has the Evaluator interface that evaluate_folders uses (set_real, evaluate, clip).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.records import preprocess_image
from .metrics import frechet_distance

FEATURE_METRICS = (("fd_vae", "FD (base-VAE features)"), ("nn_vae", "NN distance (base-VAE features)"))
FEATURE_SPACE = ("base-VAE features: the pre-trained tiny base's VAE encoder (trained on the generic domain only, "
                 "frozen in every method), posterior mean average-pooled to C x 4 x 4; FD = Frechet distance of "
                 "the generated vs real feature sets, NN = mean distance of each generated image to its nearest "
                 "real image. Lower is closer to the real phantoms.")


class VaeFeatureEvaluator:
    clip = None  # evaluate_folders asks for prompts only when there is a CLIP scorer

    def __init__(self, vae, resolution: int, pooled_size: int = 4, batch_size: int = 32):
        self.vae = vae.eval()
        self.resolution = resolution
        self.pooled_size = pooled_size
        self.batch_size = batch_size
        self._real: Optional[torch.Tensor] = None

    @torch.no_grad()
    def features(self, images: Sequence) -> torch.Tensor:
        """(N, C * pooled_size^2) features of PIL images (converted like training images)."""
        rows = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([preprocess_image(image, self.resolution)
                                  for image in images[start:start + self.batch_size]])
            pixels = pixels.to(device=self.vae.device, dtype=self.vae.dtype)
            mean = self.vae.encode(pixels).latent_dist.mean
            rows.append(F.adaptive_avg_pool2d(mean, self.pooled_size).flatten(1).double().cpu())
        return torch.cat(rows)

    def set_real(self, images) -> None:
        self._real = self.features(images)

    def evaluate(self, generated, prompts=None, real=None) -> Dict[str, float]:
        if real is not None:
            self.set_real(real)
        if self._real is None:
            raise RuntimeError("VaeFeatureEvaluator.evaluate: call set_real(images) first")
        fake = self.features(generated)
        return {"fd_vae": frechet_distance(self._real, fake),
                "nn_vae": float(torch.cdist(fake, self._real).min(dim=1).values.mean())}


class _Combined:
    """Several evaluators as one: results merged, the first one's CLIP scorer decides whether prompts are needed."""

    def __init__(self, evaluators):
        self.evaluators = list(evaluators)
        self.clip = next((e.clip for e in self.evaluators if e.clip is not None), None)

    def set_real(self, images) -> None:
        for evaluator in self.evaluators:
            evaluator.set_real(images)

    def evaluate(self, generated, prompts=None, real=None) -> Dict[str, float]:
        results: Dict[str, float] = {}
        for evaluator in self.evaluators:
            results.update(evaluator.evaluate(generated, prompts if evaluator.clip is not None else None, real))
        return results


def combined_evaluator(*evaluators) -> _Combined:
    return _Combined(evaluators)
