"""Each model family trains SeLoRA on a tiny pipeline built from configs (random weights, nothing downloaded):
the loss is finite, ranks grow (lambda = 1, t = 1), and the exported adapter, loaded into a fresh pipeline
the way that family's pipeline loads LoRAs, predicts what the trained denoiser predicts."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from selora_kernels.config import SeLoRAConfig
from selora_kernels.data.datasets import build_datasets
from selora_kernels.families import FAMILIES, DENOISER_PART, TEXT_PART, detect_family, get_family
from selora_kernels.families.base import rename_prefix
from selora_kernels.integrations.adapter_io import PEFT_WEIGHT_NAME, atomic_save_safetensors, read_safetensors
from selora_kernels.methods import make_method
from selora_kernels.training.trainer import Trainer, TrainOptions

pytestmark = pytest.mark.usefixtures("one_thread")
ORDER = ("sd2", "pixart_sigma", "sd3", "sdxl", "sana", "flux")


def family_config(family) -> SeLoRAConfig:
    targets = family.default_targets if isinstance(family.default_targets, str) else list(family.default_targets)
    return SeLoRAConfig(threshold=1.0, interval=1, target_modules=targets)


def train(family, folder, output, steps=3, resume=None, seed=0):
    torch.manual_seed(seed)  # the initial A rows come from the global generator, as in run_finetune
    pipe = family.load(folder)
    train_set, validation_set = build_datasets("synthetic", family.tokenizer(pipe), family.tiny_resolution,
                                               synthetic_count=6, seed=seed, progress=False)
    method = make_method("selora", family_config(family), seed=seed, parts=family.method_parts)
    trainer = Trainer(pipe, method, train_set, validation_set, family=family, options=TrainOptions(
        output_dir=str(output), epochs=3, batch_size=2, max_steps=steps, log_every=1, progress=False,
        tensorboard=False, seed=seed, resume=resume))
    result = trainer.train()
    trainer.close()
    return pipe, method, trainer, result, validation_set


def predict_with(family, pipe, models, batch):
    generator = torch.Generator().manual_seed(1234)
    inputs = family.prepare(pipe, family.noise_scheduler(pipe), batch, generator, torch.device("cpu"))
    with torch.no_grad():
        return family.predict(models, inputs).double()


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=ORDER)
def trained(request, tmp_path_factory):
    family = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(f"tiny_{family.name}")
    family.build_tiny(folder, seed=0)
    output = tmp_path_factory.mktemp(f"run_{family.name}")
    pipe, method, trainer, result, validation_set = train(family, folder, output)
    return family, folder, output, pipe, method, trainer, result, validation_set


def test_folder_is_detected_as_its_family(trained):
    family, folder = trained[:2]
    assert detect_family(folder) is family
    assert get_family("auto", folder) is family
    assert detect_family(trained[3]) is family  # a loaded pipeline too


def test_training_loss_is_finite_and_ranks_grow(trained):
    family, _, output, _, method, _, result, _ = trained
    with open(output / "train_log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert math.isfinite(result.best_validation_loss)
    ranks = result.ranks
    assert ranks and all(name.startswith(f"{DENOISER_PART}.") or name.startswith(f"{TEXT_PART}.") for name in ranks)
    assert sum(ranks.values()) > len(ranks), f"{family.name}: no module grew: {ranks}"
    if TEXT_PART not in family.method_parts:
        assert not any(name.startswith(f"{TEXT_PART}.") for name in ranks)


def test_export_reloads_into_a_fresh_pipeline_and_predicts_alike(trained, tmp_path):
    family, folder, _, pipe, method, trainer, result, validation_set = trained
    path = family.export(method, tmp_path)
    tensors, header = read_safetensors(path)
    prefixes = {key.split(".", 1)[0] for key in tensors}
    assert family.lora_prefix in prefixes
    metadata = json.loads(header["lora_adapter_metadata"])
    grown = {name: rank for name, rank in result.ranks.items() if rank > 1}
    name, rank = next(iter(grown.items()))
    path_in_part = name.split(".", 1)[1]
    part = family.lora_prefix if name.startswith(DENOISER_PART + ".") else TEXT_PART
    assert tensors[f"{part}.{path_in_part}.lora_A.weight"].shape[0] == rank  # per-module ranks survive

    batch = next(iter(torch.utils.data.DataLoader(validation_set, batch_size=2)))
    trained_models = {part: model.eval() for part, model in trainer.models.items()}
    expected = predict_with(family, pipe, trained_models, batch)

    fresh = family.load(folder)
    fresh_models = family.adapted_parts(fresh)
    base = predict_with(family, fresh, fresh_models, batch)
    assert relative(base, expected) > 1e-4  # the adapter changes the prediction, so the check below can fail
    family.load_exported(fresh, tmp_path)
    reloaded = predict_with(family, fresh, family.adapted_parts(fresh), batch)
    assert relative(reloaded, expected) <= 1e-5, family.name


@pytest.mark.parametrize("name", ORDER)
def test_resume_is_exact(name, tmp_path):
    family = FAMILIES[name]
    folder = tmp_path / "tiny"
    family.build_tiny(folder, seed=0)
    _, straight, *_ = train(family, folder, tmp_path / "straight", steps=4)
    train(family, folder, tmp_path / "resumed", steps=2)
    _, resumed, *_ = train(family, folder, tmp_path / "resumed", steps=4, resume=str(tmp_path / "resumed"))
    assert straight.ranks() == resumed.ranks()
    assert sum(straight.ranks().values()) > len(straight.ranks())  # growth happened across the resume
    for name, module in straight.modules.items():
        other = resumed.modules[name]
        assert torch.equal(module.lora_A[:module.rank], other.lora_A[:other.rank]), name
        assert torch.equal(module.lora_B[:, :module.rank], other.lora_B[:, :other.rank]), name


def test_sd1_and_sd2_share_a_pipeline_class_and_are_told_apart(tmp_path):
    FAMILIES["sd1"].build_tiny(tmp_path / "sd1")
    FAMILIES["sd2"].build_tiny(tmp_path / "sd2")
    assert detect_family(tmp_path / "sd1").name == "sd1"
    assert detect_family(tmp_path / "sd2").name == "sd2"
    scheduler = FAMILIES["sd2"].noise_scheduler(FAMILIES["sd2"].load(tmp_path / "sd2"))
    assert scheduler.config.prediction_type == "v_prediction"


def test_unknown_pipelines_and_names_are_clear_errors(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="'KandinskyPipeline' is not a supported model family"):
        detect_family(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        detect_family(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown model family 'sd9'"):
        get_family("sd9")
    assert get_family("auto").name == "sd1"  # the tiny default pipeline


def test_rename_prefix_moves_keys_and_metadata(tmp_path):
    path = tmp_path / PEFT_WEIGHT_NAME
    tensors = {"unet.a.lora_A.weight": torch.ones(1, 2), "text_encoder.b.lora_A.weight": torch.zeros(1, 2)}
    header = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 1, "text_encoder.r": 2})}
    atomic_save_safetensors(tensors, path, header)
    rename_prefix(path, "unet", "transformer")
    renamed, new_header = read_safetensors(path)
    assert sorted(renamed) == ["text_encoder.b.lora_A.weight", "transformer.a.lora_A.weight"]
    assert json.loads(new_header["lora_adapter_metadata"]) == {"transformer.r": 1, "text_encoder.r": 2}


def test_finetune_program_runs_a_family_with_its_preset(tmp_path):
    from selora_kernels.experiments.finetune import FinetuneOptions, run_finetune
    from selora_kernels.experiments.options import parse_options
    from python.finetune import build_parser

    parsed = parse_options(FinetuneOptions, ["--family", "pixart_sigma", "--threshold", "1.0", "--interval", "1",
                                             "--epochs", "1", "--max-steps", "2", "--batch-size", "4",
                                             "--synthetic-count", "8", "--output-dir", str(tmp_path), "--no-progress"],
                           build_parser())
    assert parsed.family == "pixart_sigma"
    result = run_finetune(parsed)
    ranks = json.loads((tmp_path / "final_ranks.json").read_text())
    assert ranks == result.ranks
    # PixArt's preset, not the SD default: feed-forward outputs are adapted, no text encoder
    assert any(name.endswith("ff.net.2") for name in ranks)
    assert not any(name.startswith(f"{TEXT_PART}.") for name in ranks)
    tensors, _ = read_safetensors(tmp_path / "peft_lora" / PEFT_WEIGHT_NAME)
    assert tensors and all(key.startswith("transformer.") for key in tensors)
    assert (tmp_path / "peft_lora" / "peft_transformer" / "adapter_config.json").is_file()
    assert detect_family(tmp_path / "tiny_pixart_sigma").name == "pixart_sigma"


@pytest.mark.parametrize("name", ["sana", "flux"])
def test_finetune_program_builds_the_tiny_pipeline_of_a_family(name, tmp_path):
    from selora_kernels.experiments.finetune import FinetuneOptions, run_finetune
    from selora_kernels.experiments.options import parse_options
    from python.finetune import build_parser

    parsed = parse_options(FinetuneOptions, ["--family", name, "--threshold", "1.0", "--interval", "1",
                                             "--epochs", "1", "--max-steps", "1", "--batch-size", "2",
                                             "--synthetic-count", "4", "--output-dir", str(tmp_path), "--no-progress"],
                           build_parser())
    result = run_finetune(parsed)
    family = FAMILIES[name]
    assert detect_family(tmp_path / f"tiny_{name}") is family
    # the family's preset, denoiser only
    assert result.ranks and all(module.startswith(f"{DENOISER_PART}.") and module.endswith(family.default_targets)
                                for module in result.ranks)
    tensors, _ = read_safetensors(tmp_path / "peft_lora" / PEFT_WEIGHT_NAME)
    assert tensors and all(key.startswith("transformer.") for key in tensors)
