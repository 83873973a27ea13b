"""FID at three Inception-v3 depths (64, 192, 2048 features), optional KID, and CLIP score.

FID follows torch-fidelity exactly (its FeatureExtractorInceptionV3 -- the network torchmetrics'
FrechetInceptionDistance wraps -- with its TF1-compatible resize, and its Frechet distance on float64
statistics), so a value here equals torchmetrics' `FrechetInceptionDistance(feature=d, antialias=False)` on the
same uint8 images. One Inception forward yields all three feature sets: "64" (after MaxPool_1), "192" (after
MaxPool_2) and "2048" (final average pool), i.e. three different depths of one network.

CLIP score is the torchmetrics convention, max(100 * cos(E_image, E_text), 0) averaged over pairs, computed here
because torchmetrics 1.9's CLIPScore breaks on transformers 5 (`get_image_features` returns a model output, not
a tensor) and truncates over-long prompts after padding (dropping the EOS token CLIP pools on).

No weight ever downloads: Inception and CLIP load from local paths, and a missing path raises an error saying
how to obtain the files. For tests, `write_random_inception_weights` and `build_tiny_clip` make randomly
initialised stand-ins with the same code paths.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..data.tiny_pipeline import write_tiny_tokenizer

FID_DIMS = (64, 192, 2048)
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
PROGRESS_MIN_BATCHES = 4  # fewer batches than this: no progress bar (they finish in moments)


def batch_bar(total: int, batch_size: int, desc: str, progress: bool):
    """A tqdm bar over `total` images, shown when progress is on and there are enough batches to wait for."""
    batches = -(-total // max(1, batch_size))
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=False,
                disable=not progress or batches < PROGRESS_MIN_BATCHES)


class MissingWeightsError(FileNotFoundError):
    """Evaluation weights are not on this machine (they are never downloaded)."""


# ------------------------------------------------------------------------------------------------ Inception
def resolve_inception_weights(path: Optional[str] = None) -> str:
    """The local Inception-v3 FID weights file: `path` (a file, or a folder holding the torch-fidelity file),
    else torch hub's checkpoint cache, where torch-fidelity would have put a download."""
    candidates = []
    if path is not None:
        path = os.path.expanduser(str(path))
        candidates.append(os.path.join(path, INCEPTION_WEIGHTS_FILE) if os.path.isdir(path) else path)
    else:
        candidates.append(os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILE))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise MissingWeightsError(
        f"Inception-v3 FID weights not found (looked for {candidates}). This library never downloads weights. "
        f"On a machine with internet, download {INCEPTION_WEIGHTS_URL} (torch-fidelity's converted TF Inception, "
        f"the one torchmetrics' FID uses), copy it here and pass its path (--inception-weights PATH).")


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID Inception-v3 loaded from a local file; returns {"64", "192", "2048": (N, d)} float64.

    input_size: the resize target inside the network (299 for real FID; tests may use a smaller size, >= 75).
    """

    def __init__(self, weights_path: Optional[str] = None, dims: Sequence[int] = FID_DIMS,
                 input_size: int = 299):
        super().__init__()
        # torch-fidelity: imported when a metric is computed, not by everything that imports evaluation/
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        dims = tuple(int(d) for d in dims)
        unknown = [d for d in dims if d not in (64, 192, 768, 2048)]
        if unknown:
            raise ValueError(f"InceptionFeatures: feature dims must be among 64, 192, 768, 2048, got {unknown}")
        if input_size < 75:
            raise ValueError(f"InceptionFeatures: input_size must be >= 75 (Inception-v3's minimum), got {input_size}")
        self.dims = dims
        self.weights_path = resolve_inception_weights(weights_path)
        try:
            self.network = FeatureExtractorInceptionV3("inception-v3-compat", [str(d) for d in dims],
                                                       feature_extractor_weights_path=self.weights_path)
        except RuntimeError as error:  # wrong keys / shapes: say which file
            raise ValueError(f"{self.weights_path} is not a torch-fidelity Inception-v3 state dict: {error}") from error
        self.network.INPUT_IMAGE_SIZE = int(input_size)  # instance attribute: the class default stays 299

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Dict[int, torch.Tensor]:
        images = as_uint8_images(images)
        outputs = self.network(images)
        return {d: out.double() for d, out in zip(self.dims, outputs)}

    @torch.no_grad()
    def extract(self, images: Sequence, batch_size: int = 16, progress: bool = True) -> Dict[int, torch.Tensor]:
        """Features of a list (or tensor) of images, in batches (a progress bar unless progress=False or the
        images fit in a few batches)."""
        chunks: Dict[int, List[torch.Tensor]] = {d: [] for d in self.dims}
        with batch_bar(len(images), batch_size, "Inception features", progress) as bar:
            for start in range(0, len(images), batch_size):
                batch = stack_images(images[start:start + batch_size])
                for d, feats in self.forward(batch).items():
                    chunks[d].append(feats)
                bar.update(len(batch))
        if not chunks[self.dims[0]]:
            raise ValueError("InceptionFeatures.extract got no images")
        return {d: torch.cat(parts) for d, parts in chunks.items()}


class _InceptionShell:
    """Builds torch-fidelity's Inception without loading anything (its constructor always loads a state dict)."""

    @staticmethod
    def build():
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # heavy: imported on use

        class _RandomInception(FeatureExtractorInceptionV3):
            def load_state_dict(self, state_dict, strict=True, assign=False):
                return None  # keep PyTorch's random init

        with tempfile.TemporaryDirectory() as tmp:
            empty = os.path.join(tmp, "empty.pth")
            torch.save({}, empty)
            return _RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)


def write_random_inception_weights(path: str, seed: int = 0) -> str:
    """Writes a randomly initialised state dict of the FID Inception-v3 (same keys/shapes as the real file).

    Convolutions get Kaiming-normal init so activations neither vanish nor explode through ~40 layers with
    BatchNorm in eval mode (running stats 0/1), keeping the features informative for plumbing tests.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = _InceptionShell.build()
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(network.state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------------ images
def as_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8; float input is taken as [0, 1]; one channel is repeated to RGB."""
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError(f"expected images as an (N, C, H, W) tensor, got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]} (shape {tuple(images.shape)})")
    if images.dtype == torch.uint8:
        return images
    if images.is_floating_point():
        return (images.clamp(0, 1) * 255).round().to(torch.uint8)
    raise TypeError(f"expected uint8 or float images, got {images.dtype}")


def pil_to_tensor(image) -> torch.Tensor:
    """A PIL image as a (3, H, W) uint8 tensor (grayscale X-rays become RGB)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def stack_images(images) -> torch.Tensor:
    """A batch tensor from a tensor, a list of (3, H, W) tensors or PIL images (all one size)."""
    if torch.is_tensor(images):
        return as_uint8_images(images)
    tensors = [pil_to_tensor(im) if not torch.is_tensor(im) else as_uint8_images(im.unsqueeze(0))[0]
               for im in images]
    sizes = {tuple(t.shape) for t in tensors}
    if len(sizes) > 1:
        raise ValueError(f"images in one batch must share a size, got {sorted(sizes)}: resize them first "
                         f"(load_image_folder(resolution=...))")
    return torch.stack(tensors)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def load_image_folder(folder: str, resolution: Optional[int] = None) -> Tuple[List, List[str]]:
    """PIL images of a folder (sorted by name) and their prompts when the folder has a metadata.jsonl
    (`file_name`, `text`; the imagefolder format that generation writes). resolution: resize the short side
    and centre-crop, as the training data is."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    prompts_by_file = {}
    metadata = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(metadata):
        with open(metadata) as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    prompts_by_file[row["file_name"]] = row.get("text", "")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"image folder {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    images = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as image:
            image = image.convert("RGB")
            if resolution is not None:
                image = resize_center_crop(image, resolution)
            images.append(image)
    prompts = [prompts_by_file.get(n, "") for n in names]
    return images, prompts


def resize_center_crop(image, resolution: int):
    """Short side to `resolution` (bicubic), then the centre `resolution` x `resolution` crop."""
    width, height = image.size
    scale = resolution / min(width, height)
    image = image.resize((max(resolution, round(width * scale)), max(resolution, round(height * scale))),
                         Image.BICUBIC)
    width, height = image.size
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


# ------------------------------------------------------------------------------------------------ FID / KID
def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor, method: str = "auto") -> float:
    """FID between two feature sets (N x d) in float64.

    method "eig": torch-fidelity's formula, tr sqrt(S_a S_b) from the eigenvalues of the d x d product.
    method "nuclear": the same quantity computed exactly from the centred features X_a, X_b:
        tr sqrt(S_a^1/2 S_b S_a^1/2) = ||X_a X_b^T||_* / sqrt((n_a - 1)(n_b - 1)),
    an n_a x n_b SVD instead of a d x d eigen-decomposition: seconds -> milliseconds at d = 2048 with a few
    hundred images, and no square roots of round-off negative eigenvalues. "auto": nuclear when N < d.
    """
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric  # heavy: imported on use

    for label, feats in (("features_a", features_a), ("features_b", features_b)):
        if feats.dim() != 2 or feats.shape[0] < 2:
            raise ValueError(f"frechet_distance: {label} must be (N >= 2, d), got {tuple(feats.shape)}")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"frechet_distance: feature sizes differ ({features_a.shape[1]} vs {features_b.shape[1]})")
    if method not in ("auto", "eig", "nuclear"):
        raise ValueError(f"frechet_distance: method must be auto, eig or nuclear, got {method!r}")
    a = features_a.detach().cpu().double()
    b = features_b.detach().cpu().double()
    if method == "auto":
        method = "nuclear" if min(a.shape[0], b.shape[0]) < a.shape[1] else "eig"
    if method == "eig":
        stats_a, stats_b = fid_features_to_statistics(a), fid_features_to_statistics(b)
        return float(fid_statistics_to_metric(stats_a, stats_b, verbose=False)["frechet_inception_distance"])
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    norm_a, norm_b = a.shape[0] - 1, b.shape[0] - 1
    mean_term = (a.mean(0) - b.mean(0)).square().sum()
    traces = centred_a.square().sum() / norm_a + centred_b.square().sum() / norm_b
    cross = torch.linalg.svdvals(centred_a @ centred_b.T).sum() / math.sqrt(norm_a * norm_b)
    return float(mean_term + traces - 2 * cross)


def kernel_inception_distance(features_a: torch.Tensor, features_b: torch.Tensor, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 2020) -> Tuple[float, float]:
    """KID (mean, std over subsets), torch-fidelity's polynomial-kernel unbiased MMD; the subset size is capped
    at the smaller set (small test sets)."""
    from torch_fidelity.metric_kid import kid_features_to_metric  # heavy: imported on use

    size = min(subset_size, features_a.shape[0], features_b.shape[0])
    if size < 2:
        raise ValueError(f"KID needs >= 2 images per set, got {features_a.shape[0]} and {features_b.shape[0]}")
    out = kid_features_to_metric(features_a.detach().cpu().double(), features_b.detach().cpu().double(),
                                 kid_subsets=subsets, kid_subset_size=size, kid_kernel="poly",
                                 kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
                                 rng_seed=seed, verbose=False)
    return float(out["kernel_inception_distance_mean"]), float(out["kernel_inception_distance_std"])


# ------------------------------------------------------------------------------------------------ CLIP
class ClipScorer:
    """CLIP score (torchmetrics convention: max(100 * cos, 0), mean over image/prompt pairs) from a local
    CLIP folder (`CLIPModel.save_pretrained` + `CLIPProcessor.save_pretrained`), or a given model/processor."""

    def __init__(self, path: Optional[str] = None, model=None, processor=None, device: str = "cpu"):
        if model is None or processor is None:
            model, processor = load_clip(path)
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        text_config = getattr(model.config, "text_config", model.config)
        self.max_length = int(getattr(text_config, "max_position_embeddings", 77))

    @torch.no_grad()
    def pair_scores(self, images, prompts: Sequence[str], batch_size: int = 16,
                    progress: bool = True) -> torch.Tensor:
        """One score per (image, prompt) pair, before averaging (a progress bar unless progress=False or the
        pairs fit in a few batches)."""
        prompts = list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"CLIP score needs one prompt per image: {len(images)} images, {len(prompts)} prompts")
        scores = []
        bar = batch_bar(len(prompts), batch_size, "CLIP score", progress)
        for start in range(0, len(prompts), batch_size):
            batch = stack_images(images[start:start + batch_size])
            pixels = self.processor(images=[im for im in batch], return_tensors="pt")["pixel_values"]
            # truncate before padding so every prompt keeps its EOS token (CLIP pools on it)
            tokens = self.processor(text=prompts[start:start + batch_size], return_tensors="pt", padding=True,
                                    truncation=True, max_length=self.max_length)
            image_emb = _embedding(self.model.get_image_features(pixel_values=pixels.to(self.device)))
            text_emb = _embedding(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                               attention_mask=tokens["attention_mask"].to(self.device)))
            image_emb = image_emb / image_emb.norm(p=2, dim=-1, keepdim=True)
            text_emb = text_emb / text_emb.norm(p=2, dim=-1, keepdim=True)
            scores.append((100 * (image_emb * text_emb).sum(-1)).double().cpu())
            bar.update(len(batch))
        bar.close()
        return torch.cat(scores)

    def score(self, images, prompts: Sequence[str], batch_size: int = 16, progress: bool = True) -> float:
        return float(self.pair_scores(images, prompts, batch_size, progress).mean().clamp_min(0))


def _embedding(output) -> torch.Tensor:
    """transformers 4 returns the projected embedding, transformers 5 a model output holding it."""
    if torch.is_tensor(output):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected CLIP feature output {type(output).__name__} (no pooler_output)")
    return pooled


def load_clip(path: Optional[str]):
    """CLIPModel and CLIPProcessor from a local folder; never downloads."""
    from transformers import CLIPModel, CLIPProcessor  # transformers: imported when CLIP is loaded (heavy)

    how = (f"This library never downloads weights. On a machine with internet: "
           f"`CLIPModel.from_pretrained('{DEFAULT_CLIP}').save_pretrained(DIR)` and "
           f"`CLIPProcessor.from_pretrained('{DEFAULT_CLIP}').save_pretrained(DIR)` (or `hf download {DEFAULT_CLIP} "
           f"--local-dir DIR`), copy DIR here and pass it (--clip-model DIR).")
    if path is None:
        raise MissingWeightsError(f"no CLIP model path given. {how}")
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingWeightsError(f"CLIP model folder {path!r} not found or has no config.json. {how}")
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise MissingWeightsError(f"could not load CLIP from {path!r}: {error}. {how}") from error
    return model, processor


def build_tiny_clip(folder: str, image_size: int = 32, seed: int = 0) -> str:
    """Saves a randomly initialised tiny CLIPModel and a processor with a byte-level tokenizer to `folder`.

    The tokenizer is the tiny pipeline's byte-level BPE one, written as files and reloaded with from_pretrained
    (transformers 5 ignores vocab/merges file arguments in the constructor).
    """
    # transformers: imported when CLIP is built (heavy)
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(os.path.join(folder, "tokenizer_files"))))
    vocab = tokenizer.get_vocab()
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass
class Evaluator:
    """Scores generated images against real ones: FID at each Inception depth, CLIP score, optional KID.

    Real-image features are computed once and reused for every generated set (3 seeds x methods).
    """

    inception: InceptionFeatures
    clip: Optional[ClipScorer] = None
    kid: bool = False
    batch_size: int = 16
    progress: bool = True  # progress bars over Inception / CLIP batches (only when there are several)
    _real_features: Optional[Dict[int, torch.Tensor]] = field(default=None, repr=False)

    @classmethod
    def from_paths(cls, inception_weights: Optional[str] = None, clip_model: Optional[str] = None,
                   kid: bool = False, batch_size: int = 16, inception_input_size: int = 299,
                   dims: Sequence[int] = FID_DIMS, device: str = "cpu", progress: bool = True) -> "Evaluator":
        inception = InceptionFeatures(inception_weights, dims=dims, input_size=inception_input_size).to(device)
        clip = ClipScorer(clip_model, device=device) if clip_model is not None else None
        return cls(inception, clip, kid, batch_size, progress)

    def set_real(self, images) -> None:
        self._real_features = self.inception.extract(images, self.batch_size, progress=self.progress)

    def evaluate(self, generated, prompts: Optional[Sequence[str]] = None, real=None) -> Dict[str, float]:
        """{"fid" (2048), "fid_64", "fid_192", ["kid", "kid_std"], ["clip_score"]} for one generated set."""
        if real is not None:
            self.set_real(real)
        if self._real_features is None:
            raise RuntimeError("Evaluator.evaluate: no real images: call set_real(images) or pass real=...")
        fake = self.inception.extract(generated, self.batch_size, progress=self.progress)
        results: Dict[str, float] = {}
        for dim in self.inception.dims:
            results[fid_key(dim)] = frechet_distance(self._real_features[dim], fake[dim])
        if self.kid:
            top = max(self.inception.dims)
            results["kid"], results["kid_std"] = kernel_inception_distance(self._real_features[top], fake[top])
        if self.clip is not None:
            if prompts is None:
                raise ValueError("Evaluator.evaluate: CLIP score needs the prompts of the generated images")
            results["clip_score"] = self.clip.score(generated, prompts, self.batch_size, progress=self.progress)
        return results


def fid_key(dim: int) -> str:
    """Result key of FID at feature size `dim`: the paper's 'FID' is the 2048 one."""
    return "fid" if int(dim) == 2048 else f"fid_{int(dim)}"


def mean_std_over_seeds(per_seed: Sequence[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """{metric: {"mean", "std", "n"}} over the runs of several seeds (std with ddof=1; 0 for one run)."""
    if not per_seed:
        raise ValueError("mean_std_over_seeds: no results")
    keys = sorted(set().union(*(r.keys() for r in per_seed)))
    summary = {}
    for key in keys:
        values = [float(r[key]) for r in per_seed if key in r and r[key] is not None
                  and math.isfinite(float(r[key]))]
        if not values:
            continue
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        summary[key] = {"mean": float(np.mean(values)), "std": std, "n": len(values)}
    return summary


def evaluate_folders(evaluator: Evaluator, generated_folders: Iterable[str], real_folder: str,
                     resolution: Optional[int] = None) -> Dict[str, object]:
    """Scores each generated folder (one per seed) against `real_folder`; returns per-seed and summary."""
    real_images, _ = load_image_folder(real_folder, resolution)
    evaluator.set_real(real_images)
    per_seed = []
    for folder in generated_folders:
        images, prompts = load_image_folder(folder, resolution)
        needs_prompts = evaluator.clip is not None
        if needs_prompts and not all(prompts):
            raise ValueError(f"{folder}: CLIP score needs prompts, but metadata.jsonl is missing or incomplete")
        result = evaluator.evaluate(images, prompts if needs_prompts else None)
        result["folder"] = folder
        per_seed.append(result)
    numeric = [{k: v for k, v in r.items() if isinstance(v, float)} for r in per_seed]
    return {"per_seed": per_seed, "summary": mean_std_over_seeds(numeric)}
