"""Memory options of the trainer, on tiny pipelines on CPU (SD 1.x: a UNet with convolutions and an adapted text
encoder; Flux: an all-linear transformer with frozen CLIP + T5):

- gradient checkpointing recomputes the forward inside the backward, yet SeLoRA's per-sample Fisher statistics,
  FI-Ratios, decisions, gradients, losses and adapters are bit-identical to a run without it;
- a bf16 base keeps the adapters (A, B, trial rows) and the optimizer state in fp32 and their initial values
  exactly those of an fp32 run;
- an fp8 base (diffusers' enable_layerwise_casting) stores the denoiser's linear/conv weights in fp8 and never an
  adapter tensor, trains and grows, with losses close to the bf16 run's.
"""
from __future__ import annotations

import itertools
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers import small_run
from selora_kernels.config import SeLoRAConfig
from selora_kernels.data.datasets import build_datasets
from selora_kernels.experiments.finetune import FinetuneOptions, run_finetune
from selora_kernels.experiments.options import parse_options
from selora_kernels.families import DENOISER_PART, FAMILIES
from selora_kernels.methods import make_method
from selora_kernels.nn.selora_linear import SeLoRALinear
from selora_kernels.training.trainer import Trainer, TrainOptions, check_memory_options

pytestmark = pytest.mark.usefixtures("one_thread")


def reset_accelerate():
    # accelerate keeps one process-wide state that refuses a second mixed precision: each run starts afresh
    from accelerate.state import AcceleratorState, GradientState  # only the tests reset it

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    reset_accelerate()
    yield
    reset_accelerate()  # the next test module's trainers run in fp32


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_folder):
    flux = tmp_path_factory.mktemp("tiny_flux")
    FAMILIES["flux"].build_tiny(flux, seed=0)
    return {"sd1": tiny_folder, "flux": flux}


def train(name, folder, output, steps=2, **options):
    """`steps` SeLoRA steps (lambda 1, t 1: every step tests and grows) of family `name`, recording per step the
    loss, every module's Fisher statistics and adapter gradients, and per module its forward calls with grad."""
    reset_accelerate()
    family = FAMILIES[name]
    torch.manual_seed(0)  # the initial A rows come from the global generator, as in run_finetune
    pipe = family.load(folder)
    train_set, validation_set = build_datasets("synthetic", family.tokenizer(pipe), family.tiny_resolution,
                                               synthetic_count=6, seed=0, progress=False)
    targets = family.default_targets if isinstance(family.default_targets, str) else list(family.default_targets)
    method = make_method("selora", SeLoRAConfig(threshold=1.0, interval=1, target_modules=targets), seed=0,
                         parts=family.method_parts)
    trainer = Trainer(pipe, method, train_set, validation_set, family=family, options=TrainOptions(
        output_dir=str(output), epochs=1, batch_size=2, max_steps=steps, log_every=1, progress=False,
        tensorboard=False, seed=0, **options))
    modules = method.modules
    initial = {key: (m.lora_A.detach().clone(), m.trial_row.detach().clone()) for key, m in modules.items()}
    statistics, gradients, calls = [], [], Counter()
    for key, module in modules.items():
        def stop(module=module, stop=module.stop_measuring):  # the statistics the decision read, then stop
            if module.measuring:
                statistics[-1][module.selora_name] = module.fisher_statistics()
            stop()
        module.stop_measuring = stop
        module.register_forward_pre_hook(lambda m, args, key=key: calls.update([key] if torch.is_grad_enabled()
                                                                               else []))
        for param in (module.lora_A, module.lora_B):
            param.register_post_accumulate_grad_hook(
                lambda p, key=key: gradients[-1].setdefault(key, []).append(p.grad.detach().clone()))
    losses = []
    loader = torch.utils.data.DataLoader(train_set, batch_size=2)
    for batch in itertools.islice(loader, steps):
        statistics.append({})
        gradients.append({})
        losses.append(trainer.train_step(batch))
    trainer.close()
    return SimpleNamespace(pipe=pipe, family=family, method=method, trainer=trainer, losses=losses,
                           statistics=statistics, gradients=gradients, calls=calls, initial=initial,
                           history=list(method.controller.history))


def assert_same_run(plain, other):
    assert plain.losses == other.losses
    assert plain.history == other.history  # FI-Ratios (floats) and decisions
    for step, (stats, grads) in enumerate(zip(plain.statistics, plain.gradients)):
        assert stats.keys() == other.statistics[step].keys() and len(stats) == len(plain.method.modules)
        for name, value in stats.items():
            assert torch.equal(value, other.statistics[step][name]), (step, name)
        assert len(grads) == len(plain.method.modules) and grads.keys() == other.gradients[step].keys()
        for key, values in grads.items():
            twin = other.gradients[step][key]
            assert len(values) == len(twin) == 2 and all(map(torch.equal, values, twin)), (step, key)
    for key, module in plain.method.modules.items():
        twin = other.method.modules[key]
        assert module.rank == twin.rank
        assert torch.equal(module.lora_A, twin.lora_A) and torch.equal(module.lora_B, twin.lora_B), key


def frozen_dtypes(model):
    """dtype -> count of the model's frozen floating parameters."""
    return Counter(p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point())


def assert_fp32_adapters(run):
    for module in run.method.modules.values():
        assert module.lora_A.dtype == module.lora_B.dtype == module.trial_row.dtype == torch.float32
    state = run.trainer._optimizer().state
    assert state and all(value.dtype == torch.float32 for entry in state.values() for value in entry.values()
                         if torch.is_tensor(value) and value.is_floating_point())


def relative(a, b) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("name", ["sd1", "flux"])
def test_gradient_checkpointing_leaves_fisher_decisions_and_gradients_exact(name, folders, tmp_path):
    plain = train(name, folders[name], tmp_path / "plain")
    checkpointed = train(name, folders[name], tmp_path / "checkpointed", gradient_checkpointing=True)
    assert plain.trainer.unet.is_gradient_checkpointing is False
    assert checkpointed.trainer.unet.is_gradient_checkpointing is True
    # the recompute ran: most adapted modules' forward ran twice per step (SD 1.x: the text encoder's too)
    recomputed = [key for key in plain.calls if checkpointed.calls[key] == 2 * plain.calls[key]]
    assert len(recomputed) >= 0.9 * len(plain.calls), (plain.calls, checkpointed.calls)
    if name == "sd1":
        assert any(key.startswith("text_encoder.") for key in recomputed)
    assert sum(rank for rank in checkpointed.method.ranks().values()) > len(checkpointed.method.modules)
    assert_same_run(plain, checkpointed)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_counts_each_use_once(reentrant):
    """Directly on two modules: statistics and gradients equal those without checkpointing, over two backward
    calls, and a module used twice inside a checkpointed block still raises."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    first, second = SeLoRALinear(8, 8), SeLoRALinear(8, 8)
    with torch.no_grad():
        first.lora_B.normal_()
        second.lora_B.normal_()
    x = torch.randn(4, 3, 8, requires_grad=True)

    def block(inputs):
        return second(torch.tanh(first(inputs)))

    results = []
    for checkpointed in (False, True):
        for module in (first, second):
            module.start_measuring()
            module.lora_A.grad = module.lora_B.grad = None
        for _ in range(2):
            y = checkpoint(block, x, use_reentrant=reentrant) if checkpointed else block(x)
            y.square().mean().backward()
        results.append([m.fisher_statistics() for m in (first, second)]
                       + [t.grad.clone() for m in (first, second) for t in (m.lora_A, m.lora_B)])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert float(results[0][0][0].sum()) > 0
    first.start_measuring()
    with pytest.raises(RuntimeError, match="more than once"):
        checkpoint(lambda inputs: first(first(inputs)), x, use_reentrant=reentrant).sum().backward()


# ---------------------------------------------------------------------------- bf16 base, fp32 adapters
@pytest.mark.parametrize("name", ["sd1", "flux"])
def test_bf16_base_keeps_adapters_and_optimizer_state_fp32(name, folders, tmp_path):
    reference = train(name, folders[name], tmp_path / "autocast", mixed_precision="bf16")  # fp32 base
    run = train(name, folders[name], tmp_path / "bf16", mixed_precision="bf16", base_storage_dtype="bf16")
    pipe = run.pipe
    assert set(frozen_dtypes(run.trainer.unet)) == {torch.bfloat16}
    if name == "sd1":  # the adapted text encoder's base too
        assert set(frozen_dtypes(pipe.text_encoder)) == {torch.bfloat16}
    else:  # frozen text encoders in bf16
        assert set(frozen_dtypes(pipe.text_encoder)) == set(frozen_dtypes(pipe.text_encoder_2)) == {torch.bfloat16}
    assert set(frozen_dtypes(pipe.vae)) == {torch.float32}  # the VAE keeps the pipeline's dtype
    assert_fp32_adapters(run)
    for key, (rows, trial) in run.initial.items():  # the adapters start exactly as in the fp32-base run
        assert torch.equal(rows, reference.initial[key][0]) and torch.equal(trial, reference.initial[key][1])
    assert all(torch.isfinite(torch.tensor(run.losses)))
    assert max(relative(a, b) for a, b in zip(run.losses, reference.losses)) < 2e-2
    assert run.method.ranks() == reference.method.ranks()
    assert sum(run.method.ranks().values()) > len(run.method.modules)


# ---------------------------------------------------------------------------- fp8 base
@pytest.mark.parametrize("name,storage", [("flux", "float8_e4m3fn"), ("sd1", "float8_e4m3fn"),
                                          ("flux", "float8_e5m2")])
def test_fp8_base_stores_denoiser_layers_in_fp8_never_adapters(name, storage, folders, tmp_path):
    bf16 = train(name, folders[name], tmp_path / "bf16", mixed_precision="bf16", base_storage_dtype="bf16")
    run = train(name, folders[name], tmp_path / storage, mixed_precision="bf16", base_storage_dtype=storage)
    dtype = getattr(torch, storage)
    denoiser = run.trainer.unet
    for module in run.method.modules.values():
        if module.selora_name.startswith(DENOISER_PART + "."):
            assert module.weight.dtype == dtype, module.selora_name  # the frozen base of adapted layers
    hooked = [layer for layer_name, layer in denoiser.named_modules() if isinstance(layer, (nn.Linear, nn.Conv2d))
              and "norm" not in layer_name and layer_name not in ("proj_in", "proj_out")]
    assert hooked and all(layer.weight.dtype == dtype for layer in hooked)
    assert set(frozen_dtypes(denoiser)) == {dtype, torch.bfloat16}  # norms and embeddings: the compute dtype
    assert_fp32_adapters(run)
    assert all(torch.isfinite(torch.tensor(run.losses)))
    assert sum(run.method.ranks().values()) > len(run.method.modules)
    tolerance = 2e-2 if dtype == torch.float8_e4m3fn else 5e-2  # e5m2: 2 mantissa bits
    assert max(relative(a, b) for a, b in zip(run.losses, bf16.losses)) < tolerance


def saved_weight_copies(run) -> int:
    """Bytes of bf16 tensors shaped like a denoiser linear weight that one training forward saves for the
    backward (the copies the fp8-stored layers computed with)."""
    shapes = {tuple(m.weight.shape) for m in run.trainer.unet.modules() if isinstance(m, nn.Linear)}
    shapes |= {shape[::-1] for shape in shapes}
    saved = {}

    def pack(tensor):
        if tensor.dtype == torch.bfloat16 and tuple(tensor.shape) in shapes:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    batch = next(iter(torch.utils.data.DataLoader(run.trainer.train_dataset, batch_size=2)))
    inputs = run.trainer._prepare_batch(batch, 0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run.trainer._loss(inputs)
    return sum(saved.values())


def test_fp8_base_with_gradient_checkpointing(folders, tmp_path):
    """All-linear transformer: exactly the run without checkpointing, and only with checkpointing does the
    forward not keep a bf16 copy of every layer for the backward. UNet: runs, its convolutions in bf16
    (diffusers' hook and torch's recompute disagree on a convolution's saved weight)."""
    options = dict(mixed_precision="bf16", base_storage_dtype="float8_e4m3fn")
    plain = train("flux", folders["flux"], tmp_path / "flux", **options)
    checkpointed = train("flux", folders["flux"], tmp_path / "flux_ckpt", gradient_checkpointing=True, **options)
    assert_same_run(plain, checkpointed)
    fp8_weights = sum(m.weight.numel() for m in plain.trainer.unet.modules()
                      if isinstance(m, nn.Linear) and m.weight.dtype == torch.float8_e4m3fn)
    assert saved_weight_copies(plain) >= 0.8 * 2 * fp8_weights  # a bf16 copy of (nearly) every fp8 weight
    assert saved_weight_copies(checkpointed) < 0.1 * saved_weight_copies(plain)
    unet = train("sd1", folders["sd1"], tmp_path / "sd1_ckpt", gradient_checkpointing=True, **options)
    convolutions = [m for m in unet.trainer.unet.modules() if isinstance(m, nn.Conv2d)]
    assert convolutions and all(m.weight.dtype == torch.bfloat16 for m in convolutions)
    assert any(m.weight.dtype == torch.float8_e4m3fn for m in unet.trainer.unet.modules() if isinstance(m, nn.Linear))
    assert all(torch.isfinite(torch.tensor(unet.losses)))


# ---------------------------------------------------------------------------- options
def test_memory_options_need_a_matching_mixed_precision():
    check_memory_options("no", "same")
    check_memory_options("bf16", "bf16")
    check_memory_options("fp16", "float8_e5m2")
    for mixed, storage in (("no", "bf16"), ("fp16", "bf16"), ("no", "float8_e4m3fn"), ("bf16", "int8")):
        with pytest.raises(ValueError):
            check_memory_options(mixed, storage)
    with pytest.raises(ValueError, match="--mixed-precision bf16"):
        TrainOptions(output_dir="x", base_storage_dtype="float8_e4m3fn")
    with pytest.raises(SystemExit):  # a usage error of the fine-tune program
        parse_options(FinetuneOptions, ["--base-storage-dtype", "bf16"])
    options = parse_options(FinetuneOptions, ["--gradient-checkpointing", "--mixed-precision", "bf16",
                                              "--base-storage-dtype", "float8_e4m3fn"])
    assert options.gradient_checkpointing and options.base_storage_dtype == "float8_e4m3fn"


def test_finetune_program_runs_with_the_memory_options(tiny_folder, tmp_path):
    options = small_run(tiny_folder, tmp_path / "run", interval=1, max_steps=2, mixed_precision="bf16",
                        base_storage_dtype="float8_e4m3fn", gradient_checkpointing=True)
    result = run_finetune(options)
    assert result.steps == 2 and sum(result.ranks.values()) > len(result.ranks)
    assert (tmp_path / "run" / "peft_lora").is_dir() and (tmp_path / "run" / "adapter.safetensors").is_file()
