"""`python -m python.compare --preset NAME`: each of the paper's comparisons parses, points at its dataset
and protocol, and runs end to end (2 training steps, 2 sampler steps, stand-in evaluation networks) on the
tiny pipeline with a dataset folder in the layout the preset reads."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from helpers import write_iu_xray
from python import compare as compare_program
from selora_kernels.data.datasets import load_split_records
from selora_kernels.data.records import PATCH_GASTRIC_SUBTYPES, load_patch_gastric_records
from selora_kernels.experiments.compare import CompareOptions
from selora_kernels.experiments.presets import PAPER_PRESETS


def write_image(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_iu_xray_images(root, reports=50):
    write_iu_xray(root, n_reports=reports, images_per_report=1, write_image=write_image)


def write_montgomery(root, count=10):
    (root / "CXR_png").mkdir(parents=True)
    (root / "ClinicalReadings").mkdir()
    for i in range(count):
        write_image(root / "CXR_png" / f"MCUCXR_{i:04d}_0.png", i)
        (root / "ClinicalReadings" / f"MCUCXR_{i:04d}_0.txt").write_text(
            f"Patient's Sex: F\nPatient's Age: 0{30 + i}Y\n\nnormal\n")


def write_patch_gastric(root, slides_per_subtype=4, patches_per_slide=3, extra_subtype=True):
    patches = root / "patches_captions"
    patches.mkdir(parents=True)
    subtypes = [s.replace("well differentiated", "Well-differentiated") for s in PATCH_GASTRIC_SUBTYPES]
    if extra_subtype:
        subtypes.append("signet ring cell carcinoma")  # not among the paper's five: never loaded
    with open(root / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "subtype", "text"])
        for s, subtype in enumerate(subtypes):
            for k in range(slides_per_subtype):
                slide = f"slide{s}x{k}"
                writer.writerow([slide, subtype, f"cells of {subtype} slide {k}"])
                for p in range(patches_per_slide):
                    write_image(patches / f"{slide}_{p:08x}.jpg", 100 * s + 10 * k + p)


def test_patch_gastric_loader_draws_per_subtype_and_splits_by_slide(tmp_path):
    write_patch_gastric(tmp_path)
    records, slides = load_patch_gastric_records(tmp_path, per_subtype=10, return_slides=True)
    assert len(records) == 5 * 10  # 12 patches per subtype, 10 drawn; the sixth subtype left out
    assert not any("signet" in r.caption for r in records)
    assert all(r.image.name.startswith(slide + "_") for r, slide in zip(records, slides))
    assert all(f"slide {slide.split('x')[1]}" in r.caption for r, slide in zip(records, slides))
    assert records == load_patch_gastric_records(tmp_path, per_subtype=10)  # seeded
    assert records != load_patch_gastric_records(tmp_path, per_subtype=10, seed=1)
    splits = load_split_records("patch_gastric", tmp_path)
    assert len(splits) == 3
    slide_sets = [{r.image.name.rpartition("_")[0] for r in split} for split in splits]
    assert all(not (slide_sets[i] & slide_sets[j]) for i in range(3) for j in range(i + 1, 3))
    assert [len(s) for s in slide_sets] == [14, 2, 4]  # 70/10/20 of the 20 slides


def test_patch_gastric_loader_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions.csv"):
        load_patch_gastric_records(tmp_path)
    write_patch_gastric(tmp_path)
    with pytest.raises(ValueError, match=r"no patches of subtypes \['not a subtype'\]"):
        load_patch_gastric_records(tmp_path, subtypes=["not a subtype"])


def test_iu_xray_384_protocol_splits_70_10_20_by_report(tmp_path):
    write_iu_xray_images(tmp_path, reports=30)
    splits = load_split_records("iu_xray_384", tmp_path)
    assert [len(s) for s in splits] == [21, 3, 6]


WRITERS = {"iu_xray": write_iu_xray_images, "iu_xray_384": write_iu_xray_images, "montgomery": write_montgomery,
           "patch_gastric": write_patch_gastric}


@pytest.mark.parametrize("preset", sorted(PAPER_PRESETS))
def test_each_paper_preset_parses_and_runs_two_steps_on_the_tiny_pipeline(preset, tmp_path, capsys):
    expected = PAPER_PRESETS[preset]
    parsed = CompareOptions(preset=preset)
    assert all(getattr(parsed, key) == value for key, value in expected.items())
    data = tmp_path / "data"
    WRITERS[expected["dataset"]](data)
    out = tmp_path / "out"
    argv = ["--preset", preset, "--data-dir", str(data), "--output-dir", str(out), "--resolution", "64",
            "--max-steps", "2", "--steps", "2", "--eval-seeds", "0", "--max-eval-prompts", "2",
            "--stand-in-eval-models", "--no-progress", "--methods", "selora,lora"]
    assert compare_program.main(argv) == 0
    rows = [json.loads(line) for line in (out / "per_seed.json").read_text().splitlines()]
    thresholds = expected.get("thresholds", (1.1,))
    assert len(rows) == len(thresholds) + 1  # one SeLoRA run per lambda, plus LoRA
