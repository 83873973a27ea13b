"""Rank heatmaps like the paper's Figures 3-4: one cell per adapted layer, coloured and labelled by rank.

The layout comes from the module names:
- UNet (SD 1.x/2.x, SDXL): rows attn1_q/k/v, attn2_q/k/v, proj (ff.net.0.proj), then any other projection of
  the transformer blocks present (attn1_out for attn1.to_out.0, ff.net.2, ...); one column per transformer
  block (down, mid, up order; `.t<i>` added when an attention holds several transformer blocks, as SDXL's).
- Text encoder: rows q, k, v, out, fc1, fc2, one column per layer.
- Transformer (PixArt, SD3, Sana, Flux, any `<...>blocks.<i>` / `layers.<i>` stack): blocks x projections, one
  row per block (`transformer_blocks.3`, `single_transformer_blocks.2`: double-stream before single-stream),
  one column per projection path inside the block (`attn.to_q`, `attn.add_k_proj`, `ff.net.2`; attention
  q, k, v, out first, then the added-stream projections, then the feed-forwards).
Modules that fit none of these (time_emb_proj, embedders, final projections) go to a panel "other" in name
order.
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
                   r"\.transformer_blocks\.(?P<tb>\d+)\.(?P<kind>.+)$")
_UNET_ROW_NAMES = {"attn1.to_q": "attn1_q", "attn1.to_k": "attn1_k", "attn1.to_v": "attn1_v", "attn2.to_q": "attn2_q",
                   "attn2.to_k": "attn2_k", "attn2.to_v": "attn2_v", "ff.net.0.proj": "proj",
                   "attn1.to_out.0": "attn1_out", "attn2.to_out.0": "attn2_out"}
_TEXT = re.compile(r"layers\.(?P<layer>\d+)\.(?P<kind>self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")
_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
# a block of a stack (`transformer_blocks.3`, `single_transformer_blocks.2`, `layers.0`): the last such index in
# the name (greedy head), followed by a projection path that is not itself a numbered sub-block list
# (`resnets.0.time_emb_proj`, `attentions.0.proj_in` stay out)
_STACK = re.compile(r"(?P<head>(?:.*\.)?)(?P<stack>[A-Za-z_]*(?:blocks|layers))\.(?P<index>\d+)\."
                    r"(?P<projection>(?![A-Za-z_]\w*\.\d+\.)[A-Za-z_][\w.]*)")
_STACK_ORDER = ("transformer_blocks", "single_transformer_blocks")  # the forward order of an MMDiT (Flux)
_PROJECTION_GROUPS = ("attn", "attn1", "attn2", "ff", "ff_context")
_PROJECTION_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                      "net.0.proj", "net.2")
TRANSFORMER_PANEL = "transformer"
PANEL_TITLES = {"unet": "UNet (by transformer block)", "text_encoder": "text encoder (by layer)",
                TRANSFORMER_PANEL: "transformer (blocks x projections)"}


def _unet_row(kind: str) -> str:
    return _UNET_ROW_NAMES.get(kind, kind)


def _text_row(kind: str) -> str:
    return kind.split(".")[-1].replace("_proj", "")


def _block_key(block: str, tb: str):
    parts = block.split(".")
    numbers = [int(p) for p in parts if p.isdigit()]
    return (_BLOCK_ORDER[parts[0]], *numbers, int(tb))


def _ordered(values, names):
    """Sort key: position in `names`, unknown values after them in name order."""
    return (names.index(values), "") if values in names else (len(names), values)


def _projection_key(projection: str):
    group, _, leaf = projection.partition(".")
    if not leaf:  # a projection of the block itself (proj_mlp, proj_out): after the grouped ones
        return (len(_PROJECTION_GROUPS) + 1, "", (0, ""), projection)
    return (*_ordered(group, _PROJECTION_GROUPS), _ordered(leaf, _PROJECTION_LEAVES), projection)


def split_block_name(name: str):
    """(block, projection) of a module name in a stack of blocks, e.g. `unet.single_transformer_blocks.2.attn.to_q`
    -> ("single_transformer_blocks.2", "attn.to_q"); None when the name is not in one. The block keeps the path
    below the model part (the first name component)."""
    match = _STACK.fullmatch(name)
    if match is None:
        return None
    head = match["head"].split(".", 1)[1] if "." in match["head"].rstrip(".") else ""
    return f"{head}{match['stack']}.{match['index']}", match["projection"]


def _block_sort_key(block: str):
    head, stack, index = re.fullmatch(r"(.*?)([A-Za-z_]*)\.(\d+)", block).groups()
    return (head, *_ordered(stack, _STACK_ORDER), int(index))


def rank_grids(ranks: Dict[str, int]) -> Dict[str, Tuple[List[str], List[str], np.ndarray]]:
    """panel -> (row labels, column labels, rank matrix with NaN for absent cells)."""
    unet, text, blocks, other = {}, {}, {}, {}
    for name, rank in ranks.items():
        if (match := _UNET.search(name)):
            unet[(_block_key(match["block"], match["tb"]), _unet_row(match["kind"]))] = (match["block"], rank)
        elif (match := _TEXT.search(name)):
            text[(int(match["layer"]), _text_row(match["kind"]))] = rank
        elif (split := split_block_name(name)) is not None:
            blocks[split] = rank
        else:
            other[name] = rank
    panels = {}
    if unet:
        columns = sorted({key for key, _ in unet})
        several = any(column[-1] > 0 for column in columns)  # an attention with more than one transformer block
        labels = {}
        for (column, _), (block, _) in unet.items():
            label = block.replace("_blocks.", "").replace(".attentions.", ".").replace("_block", "")
            labels[column] = f"{label}.t{column[-1]}" if several else label
        extra = sorted({row for _, row in unet} - set(UNET_ROWS), key=_projection_key)
        rows = list(UNET_ROWS) + extra
        matrix = np.full((len(rows), len(columns)), np.nan)
        for (column, row), (_, rank) in unet.items():
            matrix[rows.index(row), columns.index(column)] = rank
        panels["unet"] = (rows, [labels[c] for c in columns], matrix)
    if text:
        layers = sorted({layer for layer, _ in text})
        matrix = np.full((len(TEXT_ROWS), len(layers)), np.nan)
        for (layer, row), rank in text.items():
            matrix[TEXT_ROWS.index(row), layers.index(layer)] = rank
        panels["text_encoder"] = (list(TEXT_ROWS), [str(layer) for layer in layers], matrix)
    if blocks:
        rows = sorted({block for block, _ in blocks}, key=_block_sort_key)
        columns = sorted({projection for _, projection in blocks}, key=_projection_key)
        matrix = np.full((len(rows), len(columns)), np.nan)
        for (block, projection), rank in blocks.items():
            matrix[rows.index(block), columns.index(projection)] = rank
        panels[TRANSFORMER_PANEL] = (rows, columns, matrix)
    if other:
        names = sorted(other)
        panels["other"] = (["rank"], names, np.array([[other[n] for n in names]], dtype=float))
    return panels


def plot_rank_heatmaps(ranks: Dict[str, int], path, title: str = "SeLoRA ranks") -> Path:
    """Writes a PNG with one heatmap per panel (matplotlib, Agg backend: no display needed)."""
    panels = rank_grids(ranks)
    if not panels:
        raise ValueError("plot_rank_heatmaps: no ranks to plot")
    # 2 inches a panel, more for a panel of many rows (a transformer's blocks)
    heights = [max(2.0, 0.2 * len(p[0]) + 0.6) for p in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.55 * max(len(p[1]) for p in panels.values())),
                                                      2.2 + sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    high = max(ranks.values())
    for ax, (panel, (rows, columns, matrix)) in zip(axes[:, 0], panels.items()):
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=1, vmax=max(high, 2), aspect="auto")
        ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 12 else None)
        crowded = len(columns) > 12 or max(map(len, columns)) > 8  # labels wider than their cells
        rotate = 90 if panel in ("other", TRANSFORMER_PANEL) or crowded else 0
        ax.set_xticks(range(len(columns)), columns, rotation=rotate, fontsize=7)
        ax.set_title(PANEL_TITLES.get(panel, "other adapted layers"))
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
