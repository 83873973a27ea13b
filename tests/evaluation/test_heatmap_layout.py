"""The rank heatmap layout of every model family, on the module names of its tiny pipeline: each adapted module
lands in exactly one cell, at its block and projection, holding its grown rank; transformers get a blocks x
projections grid, the Stable Diffusion UNets keep the projections x transformer-blocks grid."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from selora_kernels import SeLoRAConfig, expand_modules
from selora_kernels.evaluation.heatmaps import TRANSFORMER_PANEL, plot_rank_heatmaps, rank_grids, split_block_name
from selora_kernels.families import FAMILIES, TEXT_PART
from selora_kernels.methods import make_method

pytestmark = pytest.mark.usefixtures("one_thread")
TRANSFORMER_FAMILIES = ("pixart_sigma", "sd3", "sana", "flux")


def grown_ranks(name):
    """The family's default adapters on its tiny pipeline; every third module grown once, every fifth twice more."""
    family = FAMILIES[name]
    pipe = family.build_tiny(seed=0)
    targets = family.default_targets if isinstance(family.default_targets, str) else list(family.default_targets)
    torch.manual_seed(0)
    method = make_method("selora", SeLoRAConfig(target_modules=targets), seed=0, parts=family.method_parts)
    method.inject(family.adapted_parts(pipe, family.method_parts))
    modules = list(method.modules.values())
    expand_modules(modules[::3], seed=1)
    expand_modules(modules[::5], seed=2)
    expand_modules(modules[::5], seed=3)
    ranks = method.ranks()
    assert len(set(ranks.values())) >= 3
    return ranks


def cells(grids):
    """{(panel, row label, column label): rank} of every filled cell."""
    found = {}
    for panel, (rows, columns, matrix) in grids.items():
        assert matrix.shape == (len(rows), len(columns))
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                found[(panel, rows[i], columns[j])] = int(value)
    return found


@pytest.mark.parametrize("name", TRANSFORMER_FAMILIES)
def test_transformer_families_get_a_blocks_by_projections_grid(name):
    ranks = grown_ranks(name)
    grids = rank_grids(ranks)
    assert list(grids) == [TRANSFORMER_PANEL]  # every default target sits in a block: nothing in "other"
    rows, columns, _ = grids[TRANSFORMER_PANEL]
    expected = {}
    for module, rank in ranks.items():
        path = module.split(".", 1)[1]  # "unet.transformer_blocks.1.attn.to_q" -> "transformer_blocks.1.attn.to_q"
        stack, index, projection = path.split(".", 2)
        expected[(TRANSFORMER_PANEL, f"{stack}.{index}", projection)] = rank
    assert cells(grids) == expected
    # blocks in forward order, projections q, k, v first
    assert rows == sorted(rows, key=lambda b: (b.startswith("single"), int(b.rsplit(".", 1)[1])))
    attention = [c for c in columns if c.split(".")[-1] in ("to_q", "to_k", "to_v")]
    assert columns[:3] == attention[:3] and [c.split(".")[-1] for c in attention[:3]] == ["to_q", "to_k", "to_v"]
    if name == "flux":
        assert rows == ["transformer_blocks.0", "single_transformer_blocks.0"]
        assert {"attn.add_k_proj", "ff_context.net.2"} <= set(columns)


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_unet_families_keep_projections_by_transformer_block(name):
    ranks = grown_ranks(name)
    grids = rank_grids(ranks)
    assert TRANSFORMER_PANEL not in grids
    rows, columns, _ = grids["unet"]
    assert rows[:7] == ["attn1_q", "attn1_k", "attn1_v", "attn2_q", "attn2_k", "attn2_v", "proj"]
    found = cells(grids)
    assert len(found) == len(ranks)  # one cell each ("other": one row, one column per module)
    several = name == "sdxl"  # SDXL's attentions hold 2 transformer blocks (tiny: transformer_layers_per_block 2)
    for module, rank in ranks.items():
        if module.startswith(TEXT_PART + "."):
            layer, kind = module.split("layers.")[1].split(".", 1)
            assert found[("text_encoder", kind.split(".")[-1].replace("_proj", ""), layer)] == rank
        elif ".transformer_blocks." in module:
            block, tail = module.split(".", 1)[1].split(".transformer_blocks.")
            tb, kind = tail.split(".", 1)
            label = block.replace("_blocks.", "").replace(".attentions.", ".").replace("_block", "")
            label = f"{label}.t{tb}" if several else label
            row = {"attn1.to_out.0": "attn1_out", "attn2.to_out.0": "attn2_out", "ff.net.0.proj": "proj"}.get(
                kind, kind.replace(".to_", "_"))
            assert found[("unet", row, label)] == rank, module
        else:  # time_emb_proj of the released script's set
            assert module.endswith("time_emb_proj") and found[("other", "rank", module)] == rank
    if name == "sdxl":
        assert rows[7:] == ["attn1_out", "attn2_out"] and "other" not in grids


def test_split_block_name():
    assert split_block_name("unet.single_transformer_blocks.2.attn.to_q") == ("single_transformer_blocks.2",
                                                                             "attn.to_q")
    assert split_block_name("unet.transformer_blocks.3.ff.net.2") == ("transformer_blocks.3", "ff.net.2")
    assert split_block_name("unet.transformer_blocks.0.attn.to_out.0") == ("transformer_blocks.0", "attn.to_out.0")
    assert split_block_name("unet.down_blocks.0.resnets.0.time_emb_proj") is None  # a nested block list
    assert split_block_name("unet.context_embedder") is None


def test_a_large_transformer_plots(tmp_path):
    """Flux.1's real depth (19 double-stream, 38 single-stream blocks) with embedders left to "other"."""
    projections = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "ff.net.2")
    ranks = {f"unet.transformer_blocks.{i}.{p}": 1 + (i + j) % 5 for i in range(19)
             for j, p in enumerate(projections)}
    ranks.update({f"unet.single_transformer_blocks.{i}.{p}": 1 + i % 3 for i in range(38)
                  for p in ("attn.to_q", "proj_mlp", "proj_out")})
    ranks["unet.context_embedder"] = 2
    grids = rank_grids(ranks)
    rows, columns, matrix = grids[TRANSFORMER_PANEL]
    assert len(rows) == 57 and rows[19] == "single_transformer_blocks.0"
    assert columns[-2:] == ["proj_mlp", "proj_out"]  # a block's own projections after the grouped ones
    assert np.count_nonzero(~np.isnan(matrix)) == len(ranks) - 1 and grids["other"][1] == ["unet.context_embedder"]
    path = plot_rank_heatmaps(ranks, tmp_path / "flux.png")
    assert path.stat().st_size > 10_000
