"""The pre-trained tiny base: deterministic recipe, cache keyed by the recipe, never half-written."""
import dataclasses
import os

import numpy as np
import pytest
import torch

from selora_kernels.data import base_pipeline
from selora_kernels.data.base_domain import GREY_BANDS, generic_records
from selora_kernels.data.base_pipeline import (BaseRecipe, cached_base_folder, ensure_base_pipeline, is_complete,
                                               pretrain_base, recipe_hash)

TINY = BaseRecipe(image_count=8, vae_steps=2, vae_batch_size=2, unet_steps=2, unet_batch_size=2, warmup_steps=1,
                  threads=1)


def state(pipe):
    return {f"{part}.{k}": v.clone() for part in ("vae", "unet", "text_encoder")
            for k, v in getattr(pipe, part).state_dict().items()}


def test_generic_domain_is_deterministic_and_captioned():
    a, b = generic_records(6, 32, seed=1), generic_records(6, 32, seed=1)
    assert [r.caption for r in a] == [r.caption for r in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    assert [r.caption for r in generic_records(6, 32, seed=2)] != [r.caption for r in a]
    assert all(r.image.size == (32, 32) and r.image.mode == "RGB" for r in a)


def test_grayscale_scenes_are_grey_in_many_tones_and_captions_use_known_words():
    records = generic_records(64, 32, seed=0)
    grey = [r for r in records if r.caption.startswith("grayscale photo of")]
    assert 16 <= len(grey) <= 48  # about half
    for record in grey:
        pixels = np.asarray(record.image, dtype=np.int16)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    # a grey name is a band of levels, not one level: the VAE has to learn grey as a continuous quantity
    levels = {int(np.asarray(r.image)[0, 0, 0]) for r in grey}
    assert len(levels) > len(GREY_BANDS)
    words = set(base_pipeline.BASE_WORDS)  # every caption word gets a whole-word merge in the base's tokenizer
    for record in records:
        assert set(record.caption.replace(",", " ").split()) <= words, record.caption


def test_vae_crops_sit_on_the_latent_grid_and_chroma_is_zero_for_grey():
    pixels = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).view(2, 3, 64, 64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        crop = base_pipeline._crop(pixels, 32, gen)
        assert crop.shape == (2, 3, 32, 32)
        top, left = divmod(int(crop[0, 0, 0, 0]), 64)
        assert top % 8 == 0 and left % 8 == 0 and top + 32 <= 64 and left + 32 <= 64
    assert base_pipeline._crop(pixels, 0, gen) is pixels
    grey = torch.rand(1, 1, 8, 8).expand(1, 3, 8, 8)
    assert float(base_pipeline._chroma(grey).abs().max()) < 1e-6


def test_recipe_hash_depends_on_every_field_and_the_code_version(monkeypatch):
    assert recipe_hash(TINY) == recipe_hash(dataclasses.replace(TINY))
    assert recipe_hash(TINY) != recipe_hash(dataclasses.replace(TINY, seed=1))
    assert recipe_hash(TINY) != recipe_hash(dataclasses.replace(TINY, unet_lr=2e-3))
    before = recipe_hash(TINY)
    monkeypatch.setattr(base_pipeline, "BASE_CODE_VERSION", base_pipeline.BASE_CODE_VERSION + 1)
    assert recipe_hash(TINY) != before


def test_same_recipe_same_weights_and_training_changes_them():
    first, stats = pretrain_base(TINY, progress=False)
    second, _ = pretrain_base(TINY, progress=False)
    a, b = state(first), state(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other, _ = pretrain_base(dataclasses.replace(TINY, seed=1), progress=False)
    assert any(not torch.equal(a[k], v) for k, v in state(other).items())
    assert stats["peak_rss_mb"] > 0 and stats["scaling_factor"] > 0
    # the variance head is pinned: the trainer's posterior samples are the means
    posterior = first.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist
    assert float(posterior.std.max()) < 1e-5
    # the UNet's default sample size is the VAE's latent size at the tiny resolution
    assert posterior.mean.shape[-2:] == (first.unet.config.sample_size,) * 2


def test_cache_is_reused_rebuilt_on_recipe_change_and_never_half_written(tmp_path, monkeypatch):
    calls = []
    real = base_pipeline.pretrain_base

    def counting(recipe, progress=True):
        calls.append(recipe)
        return real(recipe, progress=False)

    monkeypatch.setattr(base_pipeline, "pretrain_base", counting)
    folder, meta = ensure_base_pipeline(tmp_path, TINY, progress=False, log=lambda *_: None)
    assert is_complete(folder) and folder == cached_base_folder(tmp_path, TINY) and meta["hash"] in folder.name
    again, _ = ensure_base_pipeline(tmp_path, TINY, progress=False, log=lambda *_: None)
    assert again == folder and len(calls) == 1  # cached
    changed = dataclasses.replace(TINY, vae_steps=3)
    other, _ = ensure_base_pipeline(tmp_path, changed, progress=False, log=lambda *_: None)
    assert other != folder and len(calls) == 2 and is_complete(other)

    def crash(recipe, progress=True):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(base_pipeline, "pretrain_base", crash)
    crashed = dataclasses.replace(TINY, seed=7)
    with pytest.raises(RuntimeError, match="mid-build"):
        ensure_base_pipeline(tmp_path, crashed, progress=False, log=lambda *_: None)
    assert not cached_base_folder(tmp_path, crashed).exists()
    assert sorted(os.listdir(tmp_path)) == sorted([folder.name, other.name])  # no temporary folder left

    # an incomplete folder under the final name (not written by a build) is rebuilt, not trusted
    monkeypatch.setattr(base_pipeline, "pretrain_base", counting)
    broken = cached_base_folder(tmp_path, crashed)
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    rebuilt, _ = ensure_base_pipeline(tmp_path, crashed, progress=False, log=lambda *_: None)
    assert rebuilt == broken and is_complete(rebuilt) and len(calls) == 3
