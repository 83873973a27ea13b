"""Scores without downloaded weights (base-VAE features), CPU peak memory, and their place in the report."""
import time

import torch
from PIL import Image

from selora_kernels.data.tiny_pipeline import build_tiny_pipeline
from selora_kernels.data.synthetic import synthetic_records
from selora_kernels.evaluation.features import VaeFeatureEvaluator, combined_evaluator
from selora_kernels.evaluation.memory import RssMonitor, max_rss_mb
from selora_kernels.evaluation.report import MethodRun, results_table, write_report
from selora_kernels.evaluation.generation import save_images


def phantoms(count, seed):
    return [r.image.convert("RGB") for r in synthetic_records(count, 64, seed=seed)]


def noise(count, seed):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(count)]


def test_feature_distances_rank_similar_images_closer():
    evaluator = VaeFeatureEvaluator(build_tiny_pipeline(seed=0).vae, 64)
    evaluator.set_real(phantoms(8, 0))
    same_domain = evaluator.evaluate(phantoms(8, 1))
    other_domain = evaluator.evaluate(noise(8, 2))
    assert set(same_domain) == {"fd_vae", "nn_vae"}
    assert same_domain["fd_vae"] < other_domain["fd_vae"] and same_domain["nn_vae"] < other_domain["nn_vae"]
    assert evaluator.features(phantoms(2, 0)).shape == (2, 4 * 16)
    both = combined_evaluator(evaluator)
    assert both.clip is None and both.evaluate(phantoms(8, 1)) == same_domain


def test_rss_monitor_sees_an_allocation_and_follows_the_log(tmp_path):
    log = tmp_path / "train_log.csv"
    log.write_text("step,loss\n")
    with RssMonitor(log, interval_s=0.01) as monitor:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
        for step in (1, 2):
            with open(log, "a") as handle:
                handle.write(f"{step},0.5\n")
            time.sleep(0.1)
        del block
    assert monitor.peak_mb > 64 and monitor.peak_mb <= max_rss_mb() + 1
    assert [step for step, _ in monitor.curve] == [1.0, 2.0] and all(mb > 0 for _, mb in monitor.curve)


def test_report_shows_feature_scores_and_rss_not_zero(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,loss,total_rank,step_time_s,peak_gpu_mem_mb\n10,0.5,4,0.1,0.0\n20,0.4,5,0.1,0.0\n")
    real = save_images(phantoms(3, 0), ["a", "b", "c"], str(tmp_path / "real"))
    samples = save_images(noise(3, 1), ["a", "b", "c"], str(tmp_path / "gen"))
    metric = {"mean": 1.5, "std": 0.25, "n": 3}
    runs = [MethodRun(name="base", method="base", metrics={"fd_vae": metric, "nn_vae": metric},
                      samples_dir=samples, peak_memory_mb=900.0, memory_kind="rss"),
            MethodRun(name="LoRA", method="lora", metrics={"fd_vae": metric, "nn_vae": metric}, train_log=str(log),
                      samples_dir=samples, peak_memory_mb=812.5, memory_kind="rss",
                      memory_curve=[[10, 800.0], [20, 812.5]])]
    table = results_table(runs)
    assert "FD (base-VAE features)" in table and "FID-64" not in table
    assert "812.5 MiB (peak RSS)" in table and "1.500 ± 0.250" in table
    text = write_report(runs, tmp_path / "report", real_dir=real).read_text()
    assert "Feature space:" in text and (tmp_path / "report" / "training_curves.png").stat().st_size > 1000
