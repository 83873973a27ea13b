"""Evaluation metric plumbing on randomly initialised stand-ins (no real weights on this machine)."""
import pytest
import torch

from selora_kernels.evaluation import metrics as M

INPUT_SIZE = 75  # Inception's smallest input: same layers, ~16x cheaper than 299 on a 2-core CPU


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return M.write_random_inception_weights(str(tmp_path_factory.mktemp("inception") / "inception.pth"), seed=0)


@pytest.fixture(scope="module")
def inception(inception_file):
    return M.InceptionFeatures(inception_file, input_size=INPUT_SIZE)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return M.build_tiny_clip(str(tmp_path_factory.mktemp("clip")))


def images(seed, n=4, size=32):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_fid_identical_zero_shifted_larger(inception):
    real = images(0)
    shifted = (real.float() * 0.5 + 100).round().to(torch.uint8)
    real_features, shifted_features = inception.extract(real), inception.extract(shifted)
    for dim in M.FID_DIMS:
        scale = real_features[dim].var(0).sum().item() + real_features[dim].mean(0).square().sum().item()
        same = M.frechet_distance(real_features[dim], real_features[dim])
        other = M.frechet_distance(real_features[dim], shifted_features[dim])
        assert abs(same) < 1e-6 * scale, (dim, same)
        assert other > 1e3 * max(abs(same), 1e-12) and other > 1e-4 * scale, (dim, same, other)


def test_nuclear_fid_equals_eigen_fid():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 40, generator=g, dtype=torch.float64), torch.randn(9, 40, generator=g, dtype=torch.float64)
    b = 0.7 * b + 0.3
    eig, nuclear = M.frechet_distance(a, b, "eig"), M.frechet_distance(a, b, "nuclear")
    assert nuclear == pytest.approx(eig, rel=1e-6)
    assert M.frechet_distance(a, a, "nuclear") == pytest.approx(0.0, abs=1e-9)


def test_dims_come_from_different_layers(inception):
    features = inception.extract(images(1))
    assert {d: tuple(f.shape) for d, f in features.items()} == {64: (4, 64), 192: (4, 192), 2048: (4, 2048)}
    network = inception.network
    # each feature set is the spatial mean of a different block's output (torch-fidelity's layers)
    x = torch.nn.functional.interpolate(images(1).double(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                                        align_corners=False)
    with torch.no_grad():
        h = (x.float() - 128) / 128
        h = network.MaxPool_1(network.Conv2d_2b_3x3(network.Conv2d_2a_3x3(network.Conv2d_1a_3x3(h))))
        f64 = h.mean((2, 3))
        h = network.MaxPool_2(network.Conv2d_4a_3x3(network.Conv2d_3b_1x1(h)))
        f192 = h.mean((2, 3))
    # resize conventions differ slightly (TF1 bilinear vs torch's), so compare loosely: the layer is right
    assert torch.corrcoef(torch.stack([f64.flatten().double(), features[64].flatten()]))[0, 1] > 0.99
    assert torch.corrcoef(torch.stack([f192.flatten().double(), features[192].flatten()]))[0, 1] > 0.99
    assert not torch.allclose(features[64][:, :64], features[192][:, :64])
    assert not torch.allclose(features[192][:, :192], features[2048][:, :192])


def test_fid_matches_torchmetrics(inception, inception_file):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = images(2), images(3)
    metric = FrechetInceptionDistance(feature=64, feature_extractor_weights_path=inception_file, antialias=False)
    metric.inception.INPUT_IMAGE_SIZE = INPUT_SIZE
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = float(metric.compute())
    ours = M.frechet_distance(inception.extract(real)[64], inception.extract(fake)[64])
    assert ours == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_evaluator_kid_and_seeds(inception, clip_dir):
    evaluator = M.Evaluator(inception, M.ClipScorer(clip_dir), kid=True)
    real = images(4)
    evaluator.set_real(real)
    prompts = ["no acute disease", "mild cardiomegaly", "left lower lobe opacity", "clear lungs"]
    per_seed = [evaluator.evaluate(images(10 + s), prompts) for s in range(3)]
    for result in per_seed:
        assert set(result) == {"fid", "fid_64", "fid_192", "kid", "kid_std", "clip_score"}
        assert 0.0 <= result["clip_score"] <= 100.0
    summary = M.mean_std_over_seeds(per_seed)
    assert summary["fid"]["n"] == 3 and summary["fid"]["std"] >= 0
    values = [r["fid_64"] for r in per_seed]
    assert summary["fid_64"]["mean"] == pytest.approx(sum(values) / 3)
    assert evaluator.evaluate(real, prompts)["fid"] == pytest.approx(0.0, abs=1e-6)


def test_clip_score_convention(clip_dir):
    scorer = M.ClipScorer(clip_dir)
    batch = images(5)
    prompts = ["no acute disease", "heart size is normal " * 40, "effusion", "a"]  # one prompt > 77 tokens
    pairs = scorer.pair_scores(batch, prompts)
    assert pairs.shape == (4,) and torch.isfinite(pairs).all()
    assert (pairs.abs() <= 100).all()
    # by hand: 100 x cosine of the projected embeddings
    tokens = scorer.processor(text=prompts[:1], return_tensors="pt", padding=True)
    pixels = scorer.processor(images=[batch[0]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image = M._embedding(scorer.model.get_image_features(pixel_values=pixels))
        text = M._embedding(scorer.model.get_text_features(**tokens))
    expected = 100 * torch.nn.functional.cosine_similarity(image, text).item()
    assert pairs[0].item() == pytest.approx(expected, abs=1e-4)
    assert scorer.score(batch, prompts) == pytest.approx(max(pairs.mean().item(), 0.0))
    tokenizer = scorer.processor.tokenizer
    assert tokenizer("no acute disease").input_ids != tokenizer("mild cardiomegaly").input_ids


def test_missing_weights_clear_errors(tmp_path):
    with pytest.raises(M.MissingWeightsError, match="weights-inception-2015-12-05"):
        M.InceptionFeatures(str(tmp_path / "absent.pth"))
    with pytest.raises(M.MissingWeightsError, match="never downloads"):
        M.ClipScorer(str(tmp_path / "no_clip"))
    with pytest.raises(M.MissingWeightsError, match="no CLIP model path"):
        M.load_clip(None)


def test_folder_roundtrip(tmp_path, inception):
    from PIL import Image

    from selora_kernels.evaluation.generation import save_images

    pil = [Image.fromarray(images(6 + i, n=1, size=40)[0].permute(1, 2, 0).numpy()) for i in range(3)]
    save_images(pil, ["a", "b", "c"], str(tmp_path / "gen"), seed=0)
    loaded, prompts = M.load_image_folder(str(tmp_path / "gen"), resolution=32)
    assert prompts == ["a", "b", "c"] and loaded[0].size == (32, 32)
    evaluator = M.Evaluator(inception)
    result = M.evaluate_folders(evaluator, [str(tmp_path / "gen")], str(tmp_path / "gen"), resolution=32)
    assert result["summary"]["fid"]["mean"] == pytest.approx(0.0, abs=1e-6)


def test_progress_bars_over_inception_and_clip_batches(inception, clip_dir, monkeypatch):
    shown = []
    real_tqdm = M.tqdm

    def recording_tqdm(*args, **kwargs):
        shown.append((kwargs["desc"], not kwargs["disable"]))
        return real_tqdm(*args, **kwargs)

    monkeypatch.setattr(M, "tqdm", recording_tqdm)
    batch = images(20, n=8, size=16)
    inception.extract(batch, batch_size=2)  # 4 batches: a bar
    inception.extract(batch, batch_size=2, progress=False)
    inception.extract(batch, batch_size=8)  # one batch: no bar
    scorer = M.ClipScorer(clip_dir)
    prompts = ["clear lungs"] * 8
    assert scorer.score(batch, prompts, batch_size=2) == scorer.score(batch, prompts, batch_size=2, progress=False)
    evaluator = M.Evaluator(inception, scorer, batch_size=2, progress=False)
    evaluator.set_real(batch)
    evaluator.evaluate(batch, prompts)
    assert shown == [("Inception features", True), ("Inception features", False), ("Inception features", False),
                     ("CLIP score", True), ("CLIP score", False)] + [("Inception features", False)] * 2 \
        + [("CLIP score", False)]
