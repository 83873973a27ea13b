"""Rank heatmaps like the paper's Figures 3-4: one cell per adapted layer, coloured and labelled by rank.

UNet: rows attn1_q/k/v, attn2_q/k/v, proj (ff.net.0.proj), one column per transformer block (down, mid,
up order). Text encoder: rows q, k, v, out, fc1, fc2, one column per layer. Modules that fit neither grid
(time_emb_proj, other models) go to a third panel "other" in name order.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Tuple

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402

UNET_ROWS = ("attn1_q", "attn1_k", "attn1_v", "attn2_q", "attn2_k", "attn2_v", "proj")
TEXT_ROWS = ("q", "k", "v", "out", "fc1", "fc2")
_UNET = re.compile(r"(?P<block>(?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)"
                   r"\.transformer_blocks\.(?P<tb>\d+)\.(?P<kind>attn[12]\.to_[qkv]|ff\.net\.0\.proj)$")
_TEXT = re.compile(r"layers\.(?P<layer>\d+)\.(?P<kind>self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")
_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _unet_row(kind: str) -> str:
    return "proj" if kind.startswith("ff") else kind.replace(".to_", "_")


def _text_row(kind: str) -> str:
    return kind.split(".")[-1].replace("_proj", "")


def _block_key(block: str, tb: str):
    parts = block.split(".")
    numbers = [int(p) for p in parts if p.isdigit()]
    return (_BLOCK_ORDER[parts[0]], *numbers, int(tb))


def rank_grids(ranks: Dict[str, int]) -> Dict[str, Tuple[List[str], List[str], np.ndarray]]:
    """panel -> (row labels, column labels, rank matrix with NaN for absent cells)."""
    unet, text, other = {}, {}, {}
    for name, rank in ranks.items():
        if (match := _UNET.search(name)):
            unet[(_block_key(match["block"], match["tb"]), _unet_row(match["kind"]))] = (match["block"], rank)
        elif (match := _TEXT.search(name)):
            text[(int(match["layer"]), _text_row(match["kind"]))] = rank
        else:
            other[name] = rank
    panels = {}
    if unet:
        columns = sorted({key for key, _ in unet})
        labels = {}
        for (column, _), (block, _) in unet.items():
            labels[column] = block.replace("_blocks.", "").replace(".attentions.", ".").replace("_block", "")
        matrix = np.full((len(UNET_ROWS), len(columns)), np.nan)
        for (column, row), (_, rank) in unet.items():
            matrix[UNET_ROWS.index(row), columns.index(column)] = rank
        panels["unet"] = (list(UNET_ROWS), [labels[c] for c in columns], matrix)
    if text:
        layers = sorted({layer for layer, _ in text})
        matrix = np.full((len(TEXT_ROWS), len(layers)), np.nan)
        for (layer, row), rank in text.items():
            matrix[TEXT_ROWS.index(row), layers.index(layer)] = rank
        panels["text_encoder"] = (list(TEXT_ROWS), [str(layer) for layer in layers], matrix)
    if other:
        names = sorted(other)
        panels["other"] = (["rank"], names, np.array([[other[n] for n in names]], dtype=float))
    return panels


def plot_rank_heatmaps(ranks: Dict[str, int], path, title: str = "SeLoRA ranks") -> Path:
    """Writes a PNG with one heatmap per panel (matplotlib, Agg backend: no display needed)."""
    panels = rank_grids(ranks)
    if not panels:
        raise ValueError("plot_rank_heatmaps: no ranks to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.55 * max(len(p[1]) for p in panels.values())),
                                                      2.2 + 2.0 * len(panels)), squeeze=False)
    high = max(ranks.values())
    for ax, (panel, (rows, columns, matrix)) in zip(axes[:, 0], panels.items()):
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=1, vmax=max(high, 2), aspect="auto")
        ax.set_yticks(range(len(rows)), rows)
        rotate = 90 if panel == "other" or len(columns) > 12 else 0
        ax.set_xticks(range(len(columns)), columns, rotation=rotate, fontsize=7)
        ax.set_title({"unet": "UNet (by transformer block)", "text_encoder": "text encoder (by layer)"}.get(
            panel, "other adapted layers"))
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                ax.text(j, i, int(value), ha="center", va="center", fontsize=7,
                        color="white" if value < (high + 1) / 2 else "black")
        fig.colorbar(image, ax=ax, label="rank")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
