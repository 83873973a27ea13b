"""Datasets (incl. bad input), a short fine-tune, resume and atomic checkpoints, on the tiny pipeline."""
from __future__ import annotations

import csv
import json
import logging

import pytest
import torch
from PIL import Image

from helpers import write_iu_xray
from selora_kernels.config import SeLoRAConfig
from selora_kernels.data import records as data_mod
from selora_kernels.data.datasets import build_datasets, load_split_records
from selora_kernels.data.records import (Record, check_images, load_folder_records, load_iu_xray_records,
                                         load_montgomery_records, preprocess_image, split_records, tokenize)
from selora_kernels.data.tiny_pipeline import build_tiny_pipeline
from selora_kernels.evaluation.heatmaps import rank_grids
from selora_kernels.experiments.finetune import FinetuneOptions, run_finetune


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    pipe = build_tiny_pipeline(folder, seed=0)
    return folder, pipe.tokenizer


def write_image(path, size=(40, 30), value=128):
    Image.new("L", size, value).save(path)


# ---------------------------------------------------------------------------- data
def test_tokenizer_distinguishes_captions_and_truncates(tiny):
    _, tokenizer = tiny
    ids = tokenize(tokenizer, ["the heart size is normal", "right lower lobe opacity", "word " * 200])
    assert ids.shape == (3, 77) and not torch.equal(ids[0], ids[1])
    assert ids[2, -1] == tokenizer.eos_token_id  # truncated with EOS kept


def test_preprocess_short_side_centre_crop_range():
    image = Image.new("RGB", (90, 60), (255, 0, 0))
    pixels = preprocess_image(image, 32)
    assert pixels.shape == (3, 32, 32)
    assert pixels[0].min() == 1.0 and pixels[1].max() == -1.0


def test_folder_dataset_reports_bad_images_and_columns(tmp_path, tiny, caplog):
    _, tokenizer = tiny
    for i in range(4):
        write_image(tmp_path / f"ok{i}.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    rows = [{"file_name": f"ok{i}.png", "text": f"caption {i}"} for i in range(4)]
    rows += [{"file_name": "missing.png", "text": "x"}, {"file_name": "corrupt.png", "text": "y"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records = load_folder_records(tmp_path)
    with caplog.at_level(logging.WARNING):
        good = check_images(records, on_error="skip")
    assert len(good) == 4
    assert str(tmp_path / "missing.png") in caplog.text and str(tmp_path / "corrupt.png") in caplog.text
    with pytest.raises(ValueError, match="missing.png"):
        check_images(records, on_error="fail")
    with pytest.raises(ValueError, match=r"missing column 'findings'; columns found: \['file_name', 'text'\]"):
        load_folder_records(tmp_path, caption_column="findings")
    train, validation = build_datasets("folder", tokenizer, 16, data_dir=tmp_path, fractions=(0.5, 0.5))
    example = train[0]
    assert example["pixel_values"].shape == (3, 16, 16) and example["input_ids"].shape == (77,)
    (tmp_path / "metadata.jsonl").unlink()
    with open(tmp_path / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file_name", "caption"])
        writer.writeheader()
        writer.writerows({"file_name": r["file_name"], "caption": r["text"]} for r in rows[:4])
    assert len(load_folder_records(tmp_path, caption_column="caption")) == 4


def test_empty_split_and_unreadable_split_are_clear_errors(tmp_path, tiny):
    records = [Record(tmp_path / "a.png", "a"), Record(tmp_path / "b.png", "b")]
    with pytest.raises(ValueError, match=r"the validation split is empty: 2 records split by \[0.8, 0.16, 0.04\] gives \[2, 0, 0\]"):
        split_records(records, (0.8, 0.16, 0.04))
    with pytest.raises(ValueError, match="no readable images"):
        data_mod.ImageCaptionDataset(records, tiny[1], 16, name="folder train split")
    first = split_records(list(range(20)), (0.8, 0.2), seed=3)
    assert first == split_records(list(range(20)), (0.8, 0.2), seed=3) and len(first[0]) == 16


def test_iu_xray_frontal_images_with_findings(tmp_path):
    images = tmp_path / "images" / "images_normalized"
    images.mkdir(parents=True)
    with open(tmp_path / "indiana_reports.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uid", "MeSH", "findings", "impression"])
        writer.writerow(["1", "normal", "The heart is normal.", "ok"])
        writer.writerow(["2", "x", "", "no findings"])
    with open(tmp_path / "indiana_projections.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uid", "filename", "projection"])
        writer.writerows([["1", "1_f.png", "Frontal"], ["1", "1_l.png", "Lateral"], ["2", "2_f.png", "Frontal"]])
    records = load_iu_xray_records(tmp_path)
    assert records == [Record(images / "1_f.png", "The heart is normal.")]


def test_montgomery_prompt(tmp_path):
    (tmp_path / "CXR_png").mkdir()
    (tmp_path / "ClinicalReadings").mkdir()
    write_image(tmp_path / "CXR_png" / "MCUCXR_0001_0.png")
    write_image(tmp_path / "CXR_png" / "MCUCXR_0002_1.png")
    (tmp_path / "ClinicalReadings" / "MCUCXR_0001_0.txt").write_text(
        "Patient's Sex: F\nPatient's Age: 040Y\n\nnormal\n")
    (tmp_path / "ClinicalReadings" / "MCUCXR_0002_1.txt").write_text(
        "Patient's Sex: M\nPatient's Age: 071Y\nright upper lobe cavity\nTB\n")
    records = load_montgomery_records(tmp_path)
    assert [r.caption for r in records] == ["age:40, gender:F, findings:normal",
                                            "age:71, gender:M, findings:right upper lobe cavity TB"]


def test_heatmap_grids():
    ranks = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 3,
             "unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj": 2,
             "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v": 5,
             "text_encoder.text_model.encoder.layers.1.mlp.fc2": 4,
             "unet.down_blocks.0.resnets.0.time_emb_proj": 1}
    grids = rank_grids(ranks)
    rows, columns, matrix = grids["unet"]
    assert columns == ["down0.0", "mid.0", "up1.2"]
    assert matrix[rows.index("attn1_q"), 0] == 3 and matrix[rows.index("attn2_v"), 1] == 5
    assert matrix[rows.index("proj"), 2] == 2
    assert grids["text_encoder"][2][5, 0] == 4 and grids["other"][1] == ["unet.down_blocks.0.resnets.0.time_emb_proj"]


# ---------------------------------------------------------------------------- fine-tune, resume, checkpoints
def options(tiny_folder, out, threshold=1.0, **overrides):
    values = dict(output_dir=str(out), pretrained=str(tiny_folder), dataset="synthetic", synthetic_count=8,
                  resolution=32, epochs=2, batch_size=2, selora=SeLoRAConfig(interval=2, threshold=threshold),
                  seed=0, progress=False)
    values.update(overrides)
    return FinetuneOptions(**values)


def adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_finetune_grows_ranks_writes_reports_and_resumes_exactly(tiny, tmp_path):
    folder, _ = tiny
    straight = run_finetune(options(folder, tmp_path / "straight", max_steps=4))
    assert straight.steps == 4
    assert set(straight.ranks.values()) == {3}  # lambda = 1: every layer grows at steps 1 and 3
    out = tmp_path / "straight"
    for name in ("train_log.csv", "validation.csv", "expansions.csv", "rank_heatmap.png", "adapter.safetensors",
                 "peft_lora/pytorch_lora_weights.safetensors", "best/adapter.safetensors", "final_ranks.json"):
        assert (out / name).is_file(), name
    with open(out / "train_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert {"loss", "total_rank", "step_time_s", "peak_gpu_mem_mb"} <= rows[0].keys()
    assert any(key.startswith("rank:unet.") for key in rows[0])
    assert list((out / "tensorboard").iterdir())
    # interrupted after 2 steps, resumed to 4: the same adapter as the straight run
    run_finetune(options(folder, tmp_path / "resumed", max_steps=2))
    resumed = run_finetune(options(folder, tmp_path / "resumed", max_steps=4, resume=str(tmp_path / "resumed")))
    assert resumed.steps == 4 and resumed.ranks == straight.ranks
    a, b = adapter_tensors(out / "adapter.safetensors"), adapter_tensors(tmp_path / "resumed" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    with open(tmp_path / "resumed" / "train_log.csv") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [2, 4]
    # a resume with other settings is refused, naming the setting
    with pytest.raises(ValueError, match="threshold=1.0.*threshold=1.3"):
        run_finetune(options(folder, tmp_path / "resumed", max_steps=5, threshold=1.3,
                             resume=str(tmp_path / "resumed")))


def test_crash_during_checkpoint_keeps_the_previous_one(tiny, tmp_path, monkeypatch):
    folder, _ = tiny
    out = tmp_path / "run"
    run_finetune(options(folder, out, max_steps=2))
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 2
    real_save = torch.save

    def crashing_save(obj, path, *args, **kwargs):
        if "training_state" in str(path):
            raise RuntimeError("power cut")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="power cut"):
        run_finetune(options(folder, out, max_steps=4, resume=str(out)))
    monkeypatch.setattr(torch, "save", real_save)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")) == ["step-0000002"]
    resumed = run_finetune(options(folder, out, max_steps=4, resume=str(out)))
    assert resumed.steps == 4


# ---------------------------------------------------------------------------- data: review fixes
def test_iu_xray_splits_by_report_not_by_image(tmp_path):
    write_iu_xray(tmp_path)
    splits = load_split_records("iu_xray", tmp_path)
    assert len(splits) == 3 and sum(len(s) for s in splits) == 60
    uids = [{r.image.name.split("_")[0] for r in split} for split in splits]
    assert all(not (uids[i] & uids[j]) for i in range(3) for j in range(i + 1, 3))  # no report in two splits
    assert all(len(split) == 2 * len(u) for split, u in zip(splits, uids))  # a report's images stay together
    assert [len(u) for u in uids] == [24, 5, 1]  # fractions (0.8, 0.16, 0.04) of the 30 reports
    assert splits == load_split_records("iu_xray", tmp_path)  # seeded
    assert splits != load_split_records("iu_xray", tmp_path, split_seed=7)
    records, record_uids = load_iu_xray_records(tmp_path, return_uids=True)
    assert len(records) == len(record_uids) == 60 and record_uids[:2] == ["0", "0"]
    with pytest.raises(ValueError, match=r"the validation split is empty: 3 groups \(6 records\)"):
        split_records(records[:6], (0.8, 0.16, 0.04), groups=record_uids[:6])


def test_12_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    import numpy as np

    gradient = np.tile(np.linspace(0, 4095, 64).round().astype(np.uint16), (48, 1))  # 12 bits in a 16-bit PNG
    Image.fromarray(gradient).save(tmp_path / "xray12.png")
    Image.fromarray(np.full((48, 64), 2048, np.uint16)).save(tmp_path / "grey12.png")
    with Image.open(tmp_path / "xray12.png") as image:
        assert image.mode.startswith("I")
        pixels = preprocess_image(image, 32)
    assert pixels.min() < -0.7 and pixels.max() > 0.7  # the (centre-cropped) range, not clipped to white
    assert (pixels[:, :, 0] < pixels[:, :, -1]).all()  # the gradient survives
    with Image.open(tmp_path / "grey12.png") as image:
        grey = preprocess_image(image, 16)
    assert grey.abs().max() < 0.01  # 2048 / 4095 -> mid grey (convert("RGB") alone gave 1.0)
    big_endian = Image.fromarray(np.full((8, 8), 2048, np.uint16).byteswap().view(">u2"))
    assert big_endian.mode == "I;16B"
    assert np.asarray(data_mod.to_rgb(big_endian)).max() == 128
    full16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert np.asarray(data_mod.to_rgb(full16)).min() == 255
    eight_bit_in_i = Image.fromarray(np.full((8, 8), 200, np.int32))
    assert eight_bit_in_i.mode == "I" and np.asarray(data_mod.to_rgb(eight_bit_in_i)).max() == 200


def test_check_images_progress_bar(tmp_path, monkeypatch):
    shown = []
    real_tqdm = data_mod.tqdm
    monkeypatch.setattr(data_mod, "tqdm", lambda *a, **kw: (shown.append(not kw["disable"]), real_tqdm(*a, **kw))[1])
    write_image(tmp_path / "a.png")
    many = [Record(tmp_path / "a.png", str(i)) for i in range(120)]
    assert len(check_images(many)) == 120
    assert len(check_images(many, progress=False)) == 120
    assert len(check_images(many[:3])) == 3
    assert shown == [True, False, False]  # on for many files, off when asked or for a few
