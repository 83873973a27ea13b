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
