"""The comparison report from fake run logs and metrics: Markdown tables and PNG figures."""
import csv

import pytest
import torch
from PIL import Image

from selora_kernels.evaluation.generation import save_images
from selora_kernels.evaluation.report import MethodRun, load_runs, log_summary, read_train_log, write_report

RANK_NAMES = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
              "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
              "unet.down_blocks.0.resnets.0.time_emb_proj",
              "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
              "text_encoder.text_model.encoder.layers.1.mlp.fc2"]


def fake_log(path, grow: bool, memory: float):
    with open(path, "w", newline="") as handle:
        fields = ["step", "epoch", "loss", "total_rank", "step_time_s", "peak_gpu_mem_mb"] + [
            f"rank:{n}" for n in RANK_NAMES]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for i, step in enumerate((40, 80, 120)):
            ranks = {f"rank:{n}": (1 + i * (k % 3) if grow else 4) for k, n in enumerate(RANK_NAMES)}
            writer.writerow({"step": step, "epoch": 0, "loss": 0.5 / (i + 1), "total_rank": sum(ranks.values()),
                             "step_time_s": 0.25, "peak_gpu_mem_mb": memory + 10 * i, **ranks})
    return str(path)


def fake_samples(folder, seed):
    g = torch.Generator().manual_seed(seed)
    images = [Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy())
              for _ in range(3)]
    return save_images(images, ["no acute disease", "mild cardiomegaly", "clear lungs"], str(folder))


def metric(mean, std=1.0):
    return {"mean": mean, "std": std, "n": 3}


def test_report_folder(tmp_path):
    parameters = {"unet": {"trainable": 310016, "base": 859520964, "percent": 0.0361},
                  "text_encoder": {"trainable": 165888, "base": 123060480, "percent": 0.1348},
                  "total": {"trainable": 475904, "base": 982581444, "percent": 0.0484}}
    runs = []
    for k, lam in enumerate((1.0, 1.1, 1.3)):
        runs.append(MethodRun(name=f"SeLoRA (lambda={lam:g})", method="selora", threshold=lam,
                              metrics={"fid": metric(76.4 + 20 * k), "fid_64": metric(3.1), "fid_192": metric(5.2),
                                       "clip_score": metric(27.2)},
                              parameters=parameters, train_log=fake_log(tmp_path / f"selora{k}.csv", True, 100 + k),
                              samples_dir=fake_samples(tmp_path / f"s{k}", k)))
    for k, name in enumerate(("lora", "dylora", "adalora")):
        runs.append(MethodRun(name=name, method=name, metrics={"fid": metric(130.0 + k), "clip_score": metric(26.0)},
                              parameters=parameters, train_log=fake_log(tmp_path / f"{name}.csv", False, 120),
                              samples_dir=fake_samples(tmp_path / f"b{k}", 10 + k)))
    real = fake_samples(tmp_path / "real", 99)
    report = write_report(runs, tmp_path / "report", real_dir=real, notes=["fake numbers"])
    text = report.read_text()
    assert "| Method | FID | FID-64 | FID-192 | CLIP score |" in text
    assert "76.400 ± 1.000" in text and "310,016 (0.036%)" in text
    assert "## Lambda ablation" in text and "| 1.3 |" in text
    assert "130 MiB" not in text and "120.0 MiB" in text  # peak memory = max of the log's memory column
    assert "30.0 s" in text  # training time = 0.25 s per step x 120 steps, from the log
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert "training_curves.png" in pngs and "samples.png" in pngs
    assert sum(p.startswith("ranks_") for p in pngs) == 6
    for name in pngs:
        assert f"]({name})" in text
        assert (tmp_path / "report" / name).stat().st_size > 1000
    back = load_runs(tmp_path / "report" / "results.json")
    assert [r.name for r in back] == [r.name for r in runs] and back[0].ranks


def test_log_summary_and_errors(tmp_path):
    rows = read_train_log(fake_log(tmp_path / "log.csv", True, 50))
    summary = log_summary(rows)
    assert summary["peak_memory_mb"] == 70 and summary["training_time_s"] == pytest.approx(30.0)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_train_log(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="no runs"):
        write_report([], tmp_path / "empty")


def test_compare_command_end_to_end(tmp_path):
    """python -m python.compare on the tiny pipeline: fine-tune, generate over seeds, evaluate, report."""
    import importlib
    import json

    compare = importlib.import_module("python.compare")
    out = tmp_path / "cmp"
    code = compare.main(["--output-dir", str(out), "--methods", "selora,adalora", "--thresholds", "1.0",
                         "--epochs", "2", "--max-steps", "3", "--batch-size", "4", "--synthetic-count", "8", "--interval", "1",
                         "--eval-seeds", "0", "1", "--steps", "2", "--stand-in-eval-models",
                         "--inception-input-size", "75", "--no-progress"])
    assert code == 0
    text = (out / "report" / "report.md").read_text()
    assert "| SeLoRA (lambda=1) |" in text and "| AdaLoRA (6->4) |" in text and "RANDOMLY INITIALISED" in text
    runs = json.loads((out / "report" / "results.json").read_text())
    assert all(r["metrics"]["fid"]["n"] == 2 for r in runs)
    assert (out / "generated" / "adalora" / "seed_1" / "metadata.jsonl").is_file()
    assert (out / "report" / "samples.png").is_file()


def test_compare_missing_weights_fail_fast(tmp_path, capsys):
    import importlib

    compare = importlib.import_module("python.compare")
    code = compare.main(["--output-dir", str(tmp_path), "--inception-weights", str(tmp_path / "nope.pth")])
    assert code == 2 and "never downloads" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ review fixes
class _StubEvaluator:
    def set_real(self, images):
        self.real = images


def stub_comparison(monkeypatch, calls):
    """run_comparison with fine-tuning, generation, evaluation and the report stubbed out (seconds)."""
    from selora_kernels.experiments import compare as comparison

    def fake_generate(pipe, prompts, seeds, root, **kwargs):
        calls.append(kwargs)
        return [f"{root}/seed_{s}" for s in seeds]

    monkeypatch.setattr(comparison, "build_evaluator", lambda options: _StubEvaluator())
    monkeypatch.setattr(comparison, "exported_adapter", lambda run_dir: run_dir)
    monkeypatch.setattr(comparison, "load_pipeline_with_adapter", lambda *a, **kw: None)
    monkeypatch.setattr(comparison, "generate_for_seeds", fake_generate)
    monkeypatch.setattr(comparison, "evaluate_folders", lambda evaluator, folders, real: {
        "per_seed": [{"fid": 1.0, "folder": f} for f in folders], "summary": {"fid": {"mean": 1.0, "std": 0, "n": 1}}})
    monkeypatch.setattr(comparison, "adapter_parameter_report", lambda adapter, pipe: {})
    monkeypatch.setattr(comparison, "write_report", lambda runs, folder, **kw: folder)
    return comparison


def test_compare_generates_at_training_resolution_and_rewrites_per_seed(tmp_path, monkeypatch):
    import json

    calls = []
    comparison = stub_comparison(monkeypatch, calls)
    options = comparison.CompareOptions(output_dir=str(tmp_path), methods=("lora", "dylora"), synthetic_count=8,
                                        eval_seeds=(0, 1), progress=False)
    for _ in range(2):  # a re-run into the same folder
        comparison.run_comparison(options, finetune_fn=lambda *args: None)
    assert [(c["height"], c["width"]) for c in calls] == [(64, 64)] * 4  # tiny pipeline: 64 px, as trained
    rows = [json.loads(line) for line in (tmp_path / "per_seed.json").read_text().splitlines()]
    assert [r["run"] for r in rows] == ["lora", "dylora"]  # written whole: no rows piled up from the first run
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    calls.clear()
    comparison.run_comparison(comparison.CompareOptions(output_dir=str(tmp_path / "r48"), methods=("lora",),
                                                        synthetic_count=8, resolution=48, eval_seeds=(0,),
                                                        progress=False), finetune_fn=lambda *args: None)
    assert (calls[0]["height"], calls[0]["width"]) == (48, 48)


def test_generate_images_forwards_height_width():
    from types import SimpleNamespace

    from selora_kernels.evaluation.generation import generate_images

    seen = []

    class FakePipe:
        def set_progress_bar_config(self, **kwargs):
            pass

        def __call__(self, prompts, **kwargs):
            seen.append((kwargs["height"], kwargs["width"]))
            return SimpleNamespace(images=[Image.new("RGB", (kwargs["width"], kwargs["height"]))] * len(prompts))

    images = generate_images(FakePipe(), ["a", "b", "c"], batch_size=2, height=48, width=40, progress=False)
    assert seen == [(48, 40), (48, 40)] and images[0].size == (40, 48)


def test_evaluation_split_checks_images_like_training_and_closes_files(tmp_path):
    import json

    import numpy as np

    from selora_kernels.data.datasets import load_split_records
    from selora_kernels.experiments.compare import CompareOptions, evaluation_split

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"file_name": f"{i}.png", "text": f"caption {i}"} for i in range(20)]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for i in range(20):
        Image.new("L", (40, 30), 10 * i).save(data / f"{i}.png")
    evaluation_records = load_split_records("folder", data)[-1]
    assert len(evaluation_records) == 2
    bad, grey16 = evaluation_records[0].image, evaluation_records[1].image
    bad.write_bytes(b"not a png")
    Image.fromarray(np.full((30, 40), 2048, np.uint16)).save(grey16)  # 12-bit data in a 16-bit PNG
    options = CompareOptions(dataset="folder", data_dir=str(data), resolution=16, progress=False)
    prompts, images, train_size = evaluation_split(options)
    assert prompts == [evaluation_records[1].caption] and train_size == 18
    assert images[0].size == (16, 16) and getattr(images[0], "fp", None) is None  # no open file behind it
    assert abs(int(np.asarray(images[0]).mean()) - 128) <= 1  # scaled like training, not clipped to 255
    with pytest.raises(ValueError, match="cannot be read"):
        evaluation_split(CompareOptions(dataset="folder", data_dir=str(data), on_bad_image="fail", progress=False))


def test_generation_uses_the_tiny_pipeline_saved_with_the_run(tmp_path, monkeypatch, caplog):
    import logging

    from diffusers import StableDiffusionPipeline

    from selora_kernels.evaluation import generation
    from selora_kernels.data.tiny_pipeline import build_tiny_pipeline

    monkeypatch.setattr(StableDiffusionPipeline, "load_lora_weights", lambda self, adapter: None)
    run = tmp_path / "run"
    (run / "peft_lora").mkdir(parents=True)
    saved = build_tiny_pipeline(run / "tiny_pipeline", seed=3)  # as run_finetune(seed=3) saves it
    assert generation.saved_tiny_pipeline(str(run / "peft_lora")) == str(run / "tiny_pipeline")
    assert generation.saved_tiny_pipeline(str(run / "peft_lora" / "pytorch_lora_weights.safetensors")) \
        == str(run / "tiny_pipeline")
    pipe = generation.load_pipeline_with_adapter(None, str(run / "peft_lora"), seed=0)
    weight = next(iter(saved.unet.state_dict()))
    torch.testing.assert_close(pipe.unet.state_dict()[weight], saved.unet.state_dict()[weight])
    lonely = tmp_path / "elsewhere" / "best"
    lonely.mkdir(parents=True)
    assert generation.saved_tiny_pipeline(str(lonely)) is None
    with caplog.at_level(logging.WARNING, logger="selora_kernels.evaluation.generation"):
        rebuilt = generation.load_pipeline_with_adapter(None, str(lonely), seed=0)
    assert "ASSUMING the adapter was fine-tuned with --seed 0" in caplog.text
    assert not torch.equal(rebuilt.unet.state_dict()[weight], saved.unet.state_dict()[weight])
