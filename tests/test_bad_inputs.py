"""Bad inputs get an error of a known type whose message names the culprit (file and line, option, or module)
and what was expected; the programs print `error: <message>` and exit 2 instead of a traceback.

One table (BAD_INPUTS): each case builds its input under tmp_path and returns (action, expected), where
`expected` lists the substrings (or compiled patterns) the message must hold. Program cases run main(argv)
in-process and raise ProgramFailed(status, stderr) for a non-zero exit.
"""
from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file

from python import finetune as finetune_program
from python import generate as generate_program
from selora_kernels import SeLoRAConfig, expand_modules, inject_selora
from selora_kernels.data.records import load_folder_records
from selora_kernels.integrations.adapter_io import (FORMAT_VERSION, PEFT_WEIGHT_NAME, atomic_save_safetensors,
                                                    load_adapter, save_adapter)
from selora_kernels.nn.selora_linear import SeLoRALinear

pytestmark = pytest.mark.usefixtures("one_thread")



class ProgramFailed(Exception):
    def __init__(self, status, stderr: str):
        super().__init__(stderr)
        self.status, self.stderr = status, stderr


def run_program(main, argv):
    """Runs a program's main(argv); a non-zero exit (returned, or argparse's SystemExit) raises ProgramFailed."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exit_:
            status = exit_.code
    if status != 0:
        raise ProgramFailed(status, stderr.getvalue())
    return status


# ---------------------------------------------------------------------------- inputs
def small_model(config):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    inject_selora(model, config, prefix="unet")
    return model


def adapter_with_header(tmp_path, **changes):
    """A SeLoRA adapter file whose header entries `changes` replace what save_adapter wrote."""
    config = SeLoRAConfig(target_modules="all_linear")
    path = save_adapter(tmp_path / "adapter.safetensors", small_model(config), config)
    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
    save_file(load_file(str(path)), str(path), metadata={**header, **changes})
    return path, config


def folder_with_metadata(tmp_path, lines, name="metadata.jsonl"):
    folder = tmp_path / "data"
    folder.mkdir()
    for index in range(4):
        Image.new("L", (16, 16), 40 * index).save(folder / f"{index}.png")
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder, folder / name


def row(index, **fields):
    return json.dumps({"file_name": f"{index}.png", "text": f"caption {index}", **fields})


# ---------------------------------------------------------------------------- cases
def device_mismatch(module_device, input_device):
    def case(tmp_path):
        module = SeLoRALinear(4, 3, device=module_device)
        module.selora_name = "unet.block.to_q"
        return (lambda: module(torch.randn(2, 4, device=input_device)),
                ["unet.block.to_q", str(torch.device(module_device)), str(torch.device(input_device))])
    return case


def empty_batch_while_measuring(tmp_path):
    module = SeLoRALinear(4, 3)
    module.selora_name = "unet.block.to_k"
    module.start_measuring()

    def action():
        module(torch.randn(0, 4)).sum().backward()
        return module.fisher_scores()
    return action, ["unet.block.to_k", re.compile(r"at least (1|one) sample")]


def non_json_metadata(tmp_path):
    path, config = adapter_with_header(tmp_path, modules="{unet.0: rank 1")
    return (lambda: load_adapter(path, small_model(config), config),
            [str(path), "'modules' is not JSON", "expected a JSON dict"])


def future_format_version(tmp_path):
    path, config = adapter_with_header(tmp_path, format_version="99")
    return (lambda: load_adapter(path, small_model(config), config),
            [str(path), "format_version '99'", f"reads format_version {FORMAT_VERSION!r}"])


def row_without_caption(tmp_path):
    folder, jsonl = folder_with_metadata(tmp_path, [row(0), row(1), json.dumps({"file_name": "2.png"}), row(3)])
    return lambda: load_folder_records(folder), [f"{jsonl}:3", "has no column 'text'", "caption text"]


def malformed_line(tmp_path):
    folder, jsonl = folder_with_metadata(tmp_path, [row(0), '{"file_name": "1.png", "text": "cut off', row(2)])
    return lambda: load_folder_records(folder), [f"{jsonl}:2", "not valid JSON", "one JSON object per line"]


def null_caption(tmp_path):
    folder, jsonl = folder_with_metadata(tmp_path, [row(0), row(1, text=None), row(2), row(3, text=None)])
    return (lambda: load_folder_records(folder),
            [f"{jsonl}:2", "null", "'text'", "caption text", "2 of 4 rows", "[2, 4]"])


def csv_row_cut_short(tmp_path):
    folder, path = folder_with_metadata(tmp_path, ["file_name,text", "0.png,a", "1.png,b", "2.png"],
                                        name="metadata.csv")
    return lambda: load_folder_records(folder), [f"{path}:4", "null", "'text'"]


def finetune_flag(flag, value, expected):
    def case(tmp_path):
        argv = ["--output-dir", tmp_path / "run", flag, value]
        return lambda: run_program(finetune_program.main, argv), [flag, expected, f"got {value}"]
    return case


def finetune_on_null_captions(tmp_path):
    folder, jsonl = folder_with_metadata(tmp_path, [row(0), row(1, text=None), row(2), row(3)])
    argv = ["--output-dir", tmp_path / "run", "--dataset", "folder", "--data-dir", folder, "--epochs", 1,
            "--no-progress"]
    return lambda: run_program(finetune_program.main, argv), ["error: ", f"{jsonl}:2", "null", "'text'"]


def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a chest x-ray\n")
    return path


def generate_with_baseline_training_file(tmp_path):
    run = tmp_path / "run"
    atomic_save_safetensors({"unet.x.lora_A.default.weight": torch.zeros(1, 4)}, run / "adapter.safetensors",
                            {"format": "pt", "adapter_method": "lora", "describe": "{}"})
    atomic_save_safetensors({"unet.x.lora_A.weight": torch.zeros(1, 4)}, run / "peft_lora" / PEFT_WEIGHT_NAME,
                            {"format": "pt"})
    argv = ["--adapter", run / "adapter.safetensors", "--prompts", prompts_file(tmp_path), "--out", tmp_path / "g"]
    return (lambda: run_program(generate_program.main, argv),
            ["error: ", str(run / "adapter.safetensors"), "lora method's training file",
             f"pass {run / 'peft_lora'}"])


def generate_with_run_folder(tmp_path):
    run = tmp_path / "run"
    atomic_save_safetensors({"unet.x.lora_A.weight": torch.zeros(1, 4)}, run / "peft_lora" / PEFT_WEIGHT_NAME,
                            {"format": "pt"})
    argv = ["--adapter", run, "--prompts", prompts_file(tmp_path), "--out", tmp_path / "g"]
    return (lambda: run_program(generate_program.main, argv),
            ["error: ", f"adapter {run}: ", f"pass {run / 'peft_lora'}"])


def generate_prompts_from_malformed(tmp_path):
    folder, jsonl = folder_with_metadata(tmp_path, [row(0), "not json"])
    argv = ["--prompts-from", folder, "--out", tmp_path / "g"]
    return lambda: run_program(generate_program.main, argv), ["error: ", f"{jsonl}:2", "not valid JSON"]


def module_case(case, id, cuda=False):
    marks = []
    if cuda:
        marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
    return pytest.param(case, RuntimeError if "device" in id else ValueError, id=id, marks=marks)


BAD_INPUTS = [
    # a device mismatch is torch's RuntimeError kind; the message should add the module and both devices.
    # Without a GPU the meta device stands in for "another device".
    module_case(device_mismatch("cpu", "meta"), "device: input on meta, module on cpu"),
    module_case(device_mismatch("meta", "cpu"), "device: input on cpu, module on meta"),
    module_case(device_mismatch("cuda", "cpu"), "device: input on cpu, module on cuda", cuda=True),
    module_case(empty_batch_while_measuring, "empty batch while measuring"),
    pytest.param(non_json_metadata, ValueError, id="adapter metadata not JSON"),
    pytest.param(future_format_version, ValueError, id="adapter format_version 99"),
    pytest.param(row_without_caption, ValueError, id="metadata.jsonl row without caption"),
    pytest.param(malformed_line, ValueError, id="metadata.jsonl malformed line"),
    pytest.param(null_caption, ValueError, id="metadata.jsonl null captions"),
    pytest.param(csv_row_cut_short, ValueError, id="metadata.csv row without caption cell"),
    pytest.param(finetune_flag("--batch-size", 0, ">= 1"), ProgramFailed, id="finetune --batch-size 0"),
    pytest.param(finetune_flag("--resolution", -8, ">= 8"), ProgramFailed, id="finetune --resolution -8"),
    pytest.param(finetune_flag("--resolution", 60, "multiple of 8"), ProgramFailed, id="finetune --resolution 60"),
    pytest.param(finetune_on_null_captions, ProgramFailed, id="finetune data error: error line, exit 2"),
    pytest.param(generate_with_baseline_training_file, ProgramFailed, id="generate baseline adapter.safetensors"),
    pytest.param(generate_with_run_folder, ProgramFailed, id="generate --adapter <run dir>"),
    pytest.param(generate_prompts_from_malformed, ProgramFailed, id="generate --prompts-from malformed line"),
]


@pytest.mark.parametrize("case, error", BAD_INPUTS)
def test_bad_input_error_names_culprit_and_expectation(case, error, tmp_path):
    action, expected = case(tmp_path)
    with pytest.raises(error) as caught:
        action()
    message = str(caught.value)
    for part in expected:
        if isinstance(part, re.Pattern):
            assert part.search(message), f"{part.pattern!r} not in: {message}"
        else:
            assert part in message, f"{part!r} not in: {message}"
    if isinstance(caught.value, ProgramFailed):
        assert caught.value.status == 2, message
        assert "Traceback" not in message and re.search(r"(^|: )error: ", message, re.MULTILINE), message


# ---------------------------------------------------------------------------- accepted inputs
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder as fine-tuning leaves it: tiny_pipeline/, adapter.safetensors (SeLoRA, per-module ranks
    1..3, non-zero B) and peft_lora/ exported from the same adapters."""
    from selora_kernels.data.tiny_pipeline import build_tiny_pipeline
    from selora_kernels.methods import make_method

    run = tmp_path_factory.mktemp("run")
    pipe = build_tiny_pipeline(run / "tiny_pipeline", seed=0)
    method = make_method("selora", SeLoRAConfig(), seed=0)
    method.inject({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    modules = list(method.modules.values())
    expand_modules(modules[::2], seed=1)
    expand_modules(modules[::4], seed=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in modules:
            module.lora_B[:, :module.rank] = 0.5 * torch.randn(module.out_features, module.rank,
                                                                generator=generator)
    method.save(run / "adapter.safetensors")
    method.export(run / "peft_lora")
    return run


def generated_pixels(tiny_run, out, adapter):
    prompts = tiny_run / "prompts.txt"
    prompts.write_text("the heart size is normal\nright lower lobe opacity\n")
    argv = ["--prompts", prompts, "--out", out, "--seeds", 0, "--steps", 2, "--resolution", 64, "--no-progress"]
    argv += ["--adapter", adapter] if adapter is not None else []
    run_program(generate_program.main, argv)
    return [torch.from_numpy(np.array(Image.open(out / "seed_0" / f"{i:05d}.png"))) for i in range(2)]


def test_generate_accepts_the_selora_adapter_file(tiny_run, tmp_path):
    """--adapter <run>/adapter.safetensors draws the same images as --adapter <run>/peft_lora, and not those of
    the base pipeline (the adapter is really applied)."""
    from_file = generated_pixels(tiny_run, tmp_path / "file", tiny_run / "adapter.safetensors")
    from_export = generated_pixels(tiny_run, tmp_path / "export", tiny_run / "peft_lora")
    base = generated_pixels(tiny_run, tmp_path / "base", None)
    for a, b, c in zip(from_file, from_export, base):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
