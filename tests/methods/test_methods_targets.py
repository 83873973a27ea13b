"""Every adapter method adapts the same layers: target_modules and exclude_modules resolved by one function
(integrations.targets.resolve_target_names), on the tiny Stable Diffusion pipeline."""
import copy

import pytest
from torch import nn

from selora_kernels.config import SeLoRAConfig
from selora_kernels.data.tiny_pipeline import build_tiny_pipeline
from selora_kernels.integrations.targets import resolve_target_names
from selora_kernels.methods import METHODS, make_method

# one excluded module per part: a qualified name (UNet) and a relative glob (text encoder)
EXCLUDED_UNET = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
EXCLUDED_TEXT = "*layers.0.mlp.fc1"
EXCLUDE = [EXCLUDED_UNET, EXCLUDED_TEXT]


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_pipeline(seed=0)


def adapted(name, pipe, config):
    """(names inject returns, names in ranks(), part -> paths whose layer is no longer a plain nn.Linear)."""
    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    method = make_method(name, config, total_steps=5)
    returned = method.inject({"unet": unet, "text_encoder": text_encoder})
    qualified = sorted(f"{part}.{path}" for part, paths in returned.items() for path in paths)
    replaced = sorted(f"{part}.{path}" for part, model in (("unet", unet), ("text_encoder", text_encoder))
                      for path, module in getattr(pipe, part).named_modules()
                      if type(module) is nn.Linear and type(model.get_submodule(path)) is not nn.Linear)
    return qualified, sorted(method.ranks()), replaced


def test_every_method_adapts_the_same_layers_and_honours_exclude_modules(tiny_pipe):
    config = SeLoRAConfig(exclude_modules=EXCLUDE)
    everything = {name: adapted(name, tiny_pipe, SeLoRAConfig()) for name in METHODS}
    excluded = {name: adapted(name, tiny_pipe, config) for name in METHODS}
    reference_names = excluded["selora"][0]
    text_fc1 = "text_encoder.encoder.layers.0.mlp.fc1"
    for name in METHODS:
        returned, ranked, replaced = excluded[name]
        assert returned == ranked == replaced == reference_names, name
        assert EXCLUDED_UNET not in returned and text_fc1 not in returned, name
        full = everything[name][0]
        assert EXCLUDED_UNET in full and text_fc1 in full, name  # the exclusion removed them, nothing else did
        assert sorted(set(full) - set(returned)) == sorted([EXCLUDED_UNET, text_fc1]), name


def test_resolve_target_names_matches_prefixed_and_relative_patterns(tiny_pipe):
    unet = tiny_pipe.unet
    every = resolve_target_names(unet, "released_script", prefix="unet")
    assert resolve_target_names(unet, "reference_code", prefix="unet") == every  # the old spelling still works
    relative = EXCLUDED_UNET.split(".", 1)[1]
    assert relative in every
    for exclude in ([EXCLUDED_UNET], [relative], ["down_blocks.0.attentions.0.*.attn1.to_q"]):
        assert resolve_target_names(unet, "released_script", exclude, prefix="unet") == \
            [n for n in every if n != relative], exclude
