"""The comparison report: one folder per run with report.md, results.json and PNG figures.

- Table like the paper's Tables 1/2: method x FID (2048), FID-64, FID-192, CLIP score (mean +- std over seeds),
  trainable parameters (% of UNet and of text encoder), peak memory, training time.
- Lambda ablation like Table 3 (SeLoRA runs at lambda 1.0 / 1.1 / 1.3): FID, CLIP, final total rank.
- Rank heatmaps per method with per-module ranks (Figures 3-4; heatmaps.plot_rank_heatmaps).
- Memory, loss and total rank over training steps (Figures 11-12), from the training CSV logs
  (columns step, loss, total_rank, rank:<module>..., step_time_s, peak_gpu_mem_mb; alternative names accepted).
- A grid of real vs generated images per method for the same prompts.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402

from . import features  # noqa: E402
from .heatmaps import plot_rank_heatmaps  # noqa: E402
from .metrics import load_image_folder  # noqa: E402

METRIC_COLUMNS = (("fid", "FID"), ("fid_64", "FID-64"), ("fid_192", "FID-192"), ("clip_score", "CLIP score"))
# scores without downloaded weights (evaluation.features); shown when a run has them
FEATURE_COLUMNS = (("fd_vae", "FD (base-VAE features)"), ("nn_vae", "NN distance (base-VAE features)"))
MEMORY_COLUMNS = ("peak_gpu_mem_mb", "peak_memory_mb", "peak_mem_mb", "memory_mb")
STEP_TIME_COLUMNS = ("step_time_s", "step_time")
RANK_PREFIX = "rank:"


@dataclass
class MethodRun:
    """Everything the report knows about one fine-tuned method.

    metrics: {"fid": {"mean", "std", "n"}, "fid_64": ..., "fid_192": ..., "clip_score": ...} (mean_std_over_seeds)
    parameters: a parameter report {"unet": {"trainable", "base", "percent"}, "text_encoder": ..., "total": ...}
    train_log: the trainer's train_log.csv; ranks: final per-module ranks; samples_dir: generated images of one
    seed (metadata.jsonl order = prompt order); threshold: lambda of a SeLoRA run (ablation rows).
    """

    name: str
    method: str
    metrics: Dict[str, Dict[str, float]] = field(default_factory=dict)
    parameters: Optional[Dict[str, Dict[str, float]]] = None
    train_log: Optional[str] = None
    ranks: Optional[Dict[str, int]] = None
    samples_dir: Optional[str] = None
    threshold: Optional[float] = None
    training_time_s: Optional[float] = None
    peak_memory_mb: Optional[float] = None
    memory_kind: Optional[str] = None  # "rss": process resident set size (no CUDA); None: the log's GPU memory
    memory_curve: Optional[List[List[float]]] = None  # (step, peak MiB so far) when the log has no memory


# ------------------------------------------------------------------------------------------------ logs
def read_train_log(path) -> List[Dict[str, float]]:
    """Rows of a training CSV log as floats (non-numeric cells dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log {path} does not exist")
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            row = {}
            for key, value in raw.items():
                try:
                    row[key] = float(value)
                except (TypeError, ValueError):
                    continue
            if "step" not in row:
                raise ValueError(f"{path}: every row needs a numeric 'step' column, got columns {list(raw)}")
            rows.append(row)
    return rows


def _first_column(rows, names) -> Optional[str]:
    for name in names:
        if rows and name in rows[0]:
            return name
    return None


def log_summary(rows: List[Dict[str, float]]) -> Dict[str, Optional[float]]:
    """Peak memory (max of the memory column), training time (step time x steps between rows), final ranks."""
    memory_column = _first_column(rows, MEMORY_COLUMNS)
    time_column = _first_column(rows, STEP_TIME_COLUMNS)
    summary: Dict[str, Optional[float]] = {"peak_memory_mb": None, "training_time_s": None, "final_total_rank": None}
    if not rows:
        return summary
    if memory_column:
        summary["peak_memory_mb"] = max(r.get(memory_column, 0.0) for r in rows)
    if time_column:
        total, previous = 0.0, 0.0
        for row in rows:  # each row's step time is the mean over the steps since the previous row
            total += row.get(time_column, 0.0) * max(row["step"] - previous, 0.0)
            previous = row["step"]
        summary["training_time_s"] = total
    if "total_rank" in rows[-1]:
        summary["final_total_rank"] = rows[-1]["total_rank"]
    return summary


def final_ranks_from_log(rows: List[Dict[str, float]]) -> Dict[str, int]:
    if not rows:
        return {}
    return {k[len(RANK_PREFIX):]: int(v) for k, v in rows[-1].items() if k.startswith(RANK_PREFIX)}


# ------------------------------------------------------------------------------------------------ tables
def format_metric(entry) -> str:
    if entry is None:
        return "-"
    if isinstance(entry, (int, float)):
        return f"{entry:.3f}"
    mean, std, n = entry.get("mean"), entry.get("std", 0.0), entry.get("n", 1)
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if n and n > 1 else f"{mean:.3f}"


def format_count(parameters, part: str) -> str:
    if not parameters or part not in parameters:
        return "-"
    entry = parameters[part]
    return f"{int(entry['trainable']):,} ({entry['percent']:.3f}%)"


def format_optional(value, unit: str, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f} {unit}"


def metric_columns(runs: Sequence[MethodRun]):
    """FID/CLIP columns when any run has one of them or none has a feature score; feature columns when present."""
    present = {key for run in runs for key in run.metrics}
    columns = [c for c in FEATURE_COLUMNS if c[0] in present]
    if not columns or present & {key for key, _ in METRIC_COLUMNS}:
        columns = list(METRIC_COLUMNS) + columns
    return columns


def format_memory(run: MethodRun) -> str:
    # the trainer logs 0 MiB without a GPU: that is "not measured", not "no memory"
    text = format_optional(run.peak_memory_mb or None, "MiB")
    return text + " (peak RSS)" if run.memory_kind == "rss" and text != "-" else text


def results_table(runs: Sequence[MethodRun]) -> str:
    columns = metric_columns(runs)
    header = (["Method"] + [label for _, label in columns]
              + ["Trainable UNet (%)", "Trainable text encoder (%)", "Peak memory", "Training time"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run.name] + [format_metric(run.metrics.get(key)) for key, _ in columns]
        cells += [format_count(run.parameters, "unet"), format_count(run.parameters, "text_encoder"),
                  format_memory(run), format_optional(run.training_time_s, "s")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(runs: Sequence[MethodRun]) -> Optional[str]:
    """Table 3: SeLoRA runs by lambda (None when fewer than two lambdas were run)."""
    selora = sorted((r for r in runs if r.method == "selora" and r.threshold is not None), key=lambda r: r.threshold)
    if len({r.threshold for r in selora}) < 2:
        return None
    lines = ["| lambda | FID | CLIP score | final total rank |", "|---|---|---|---|"]
    for run in selora:
        total_rank = sum(run.ranks.values()) if run.ranks else None
        lines.append(f"| {run.threshold:g} | {format_metric(run.metrics.get('fid'))} | "
                     f"{format_metric(run.metrics.get('clip_score'))} | {'-' if total_rank is None else total_rank} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ figures
def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower() or "run"


def plot_training_curves(logs: Dict[str, List[Dict[str, float]]], path,
                         memory_curves: Optional[Dict[str, Sequence]] = None) -> Optional[Path]:
    """Peak memory, loss, total rank and step time over steps, one line per method (Figures 11-12).
    memory_curves: {name: [(step, MiB), ...]} used instead of a log whose memory column is all 0 (no CUDA)."""
    memory_curves = {name: curve for name, curve in (memory_curves or {}).items() if curve}
    logs = {name: rows for name, rows in logs.items() if rows}
    if not logs:
        return None
    panels = [("memory", MEMORY_COLUMNS, "peak memory (MiB)"), ("loss", ("loss",), "training loss"),
              ("rank", ("total_rank",), "total rank"), ("time", STEP_TIME_COLUMNS, "step time (s)")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for axis, (panel, columns, label) in zip(axes, panels):
        for name, rows in logs.items():
            column = _first_column(rows, columns)
            if panel == "memory" and name in memory_curves and not any(r.get(column or "", 0) for r in rows):
                steps, values = zip(*memory_curves[name])
                axis.plot(steps, values, marker="o", markersize=3, label=name)
                axis.set_ylabel("peak process RSS (MiB, no CUDA)")
                continue
            if column is None:
                continue
            axis.plot([r["step"] for r in rows], [r.get(column, float("nan")) for r in rows], marker="o",
                      markersize=3, label=name)
        axis.set_xlabel("step")
        if not axis.get_ylabel():
            axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_sample_grid(runs: Sequence[MethodRun], path, real_dir: Optional[str] = None,
                     num_samples: int = 4) -> Optional[Path]:
    """Rows: each method, then the real images (when given); columns: the first `num_samples` prompts."""
    rows = []
    prompts: List[str] = []
    real_row = None
    if real_dir is not None:
        images, prompts = load_image_folder(real_dir)
        real_row = ("real", images[:num_samples])
    for run in runs:
        if run.samples_dir and os.path.isdir(run.samples_dir):
            images, run_prompts = load_image_folder(run.samples_dir)
            rows.append((run.name, images[:num_samples]))
            if not any(prompts):
                prompts = run_prompts
    if real_row is not None:
        rows.append(real_row)
    rows = [(name, images) for name, images in rows if images]
    if not rows:
        return None
    columns = max(len(images) for _, images in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.0 * columns + 1, 2.0 * len(rows) + 0.6),
                                squeeze=False)
    for r, (name, images) in enumerate(rows):
        for c in range(columns):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c < len(images):
                axis.imshow(images[c], interpolation="nearest")
            if c == 0:
                axis.set_ylabel(name, fontsize=8)
            if r == 0 and c < len(prompts) and prompts[c]:
                text = prompts[c]
                axis.set_title(text if len(text) <= 40 else text[:37] + "...", fontsize=6)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------------ report
def write_report(runs: Sequence[MethodRun], output_dir, title: str = "SeLoRA vs LoRA / DyLoRA / AdaLoRA",
                 real_dir: Optional[str] = None, num_samples: int = 4, notes: Sequence[str] = ()) -> Path:
    """Writes report.md, results.json and the figures to `output_dir`; returns the report.md path."""
    runs = list(runs)
    if not runs:
        raise ValueError("write_report: no runs")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    logs = {}
    for run in runs:
        if run.train_log:
            rows = read_train_log(run.train_log)
            logs[run.name] = rows
            summary = log_summary(rows)
            if run.peak_memory_mb is None:
                run.peak_memory_mb = summary["peak_memory_mb"]
            if run.training_time_s is None:
                run.training_time_s = summary["training_time_s"]
            if run.ranks is None:
                run.ranks = final_ranks_from_log(rows) or None
    lines = [f"# {title}", ""]
    lines += ["## Results (mean ± std over seeds)", "", results_table(runs), ""]
    shown = {key for key, _ in metric_columns(runs)}
    if "fid" in shown:
        lines += ["FID: Inception-v3 2048-d final pool; FID-64 / FID-192: the 64- and 192-channel intermediate "
                  "blocks (torch-fidelity layers). CLIP score: 100 x cosine, clamped at 0.", ""]
    if shown & {key for key, _ in FEATURE_COLUMNS}:
        lines += [f"Feature space: {features.FEATURE_SPACE}", ""]
    lines += ["Trainable %: adapter parameters over the frozen model part's parameters. Peak memory: CUDA's peak "
              "allocation, or the process's peak resident set size (RSS, sampled) where there is no CUDA.", ""]
    ablation = ablation_table(runs)
    if ablation:
        lines += ["## Lambda ablation (SeLoRA)", "", ablation, ""]
    curves = plot_training_curves(logs, output / "training_curves.png",
                                  {run.name: run.memory_curve for run in runs if run.memory_curve})
    if curves:
        lines += ["## Memory, loss and rank over training", "", f"![training curves]({curves.name})", ""]
    heatmaps = []
    for run in runs:
        if run.ranks:
            path = plot_rank_heatmaps(run.ranks, output / f"ranks_{_slug(run.name)}.png",
                                      title=f"{run.name}: ranks (total {sum(run.ranks.values())})")
            heatmaps.append((run.name, path))
    if heatmaps:
        lines += ["## Ranks per layer", ""]
        lines += [f"### {name}\n\n![ranks {name}]({path.name})\n" for name, path in heatmaps]
    grid = plot_sample_grid(runs, output / "samples.png", real_dir=real_dir, num_samples=num_samples)
    if grid:
        lines += ["## Samples (same prompts, seed 0; rows top to bottom as in the table, real last)", "",
                  f"![samples]({grid.name})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    report = output / "report.md"
    report.write_text("\n".join(lines))
    (output / "results.json").write_text(json.dumps([asdict(run) for run in runs], indent=2, default=str))
    return report


def load_runs(path) -> List[MethodRun]:
    """Runs back from a results.json written by write_report."""
    return [MethodRun(**entry) for entry in json.loads(Path(path).read_text())]
