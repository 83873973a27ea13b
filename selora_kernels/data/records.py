"""Image-caption records and their preprocessing: a captioned image folder, IU X-Ray, Montgomery County CXR,
PatchGastricADC22.

Every loader returns records (image source, caption); `ImageCaptionDataset` preprocesses them the way the
paper does: short side resized to the resolution (224 or 384 in the paper), centre crop, RGB in [-1, 1],
captions tokenized and truncated to the tokenizer limit (77 with BOS/EOS for CLIP). Images that are
missing or unreadable are checked up front and reported with their path: skipped with a warning
(on_error="skip") or raised (on_error="fail"), never dropped silently.

16-bit grayscale images (PIL modes "I;16", "I;16B", "I;16L", "I"; e.g. 12-bit X-rays stored in 16-bit PNGs) are
scaled to 8 bits by the full range of the bit depth their data occupies (`to_rgb`), not clipped at 255.
IU X-Ray is split by report (uid) before expanding to images, so no report is in two splits.
"""
from __future__ import annotations

import csv
import json
import logging
import random
import re
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

class Record(NamedTuple):
    image: Union[str, Path, Image.Image]  # a file, or an image made in memory (synthetic data)
    caption: str


# ---------------------------------------------------------------------------- preprocessing
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `image`. PIL's convert("RGB") clips integer modes ("I;16*", "I") at 255, which
    turns a 12- or 16-bit X-ray almost white; those are scaled instead: value * 255 / (2**bits - 1), where
    bits is the smallest bit depth >= 8 that holds the image's maximum (a 12-bit image: / 4095, a full 16-bit
    one: / 65535, data <= 255: unchanged). The divisor is the range of the bit depth present, not the
    image's own maximum, so the brightness of images of one depth stays comparable. Negative values clip to 0."""
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image.convert("RGB")
    values = np.asarray(image).astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    bits = max(8, int(np.ceil(np.log2(top + 1.0)))) if top > 0 else 8
    scaled = np.clip(np.round(values * (255.0 / (2.0 ** bits - 1.0))), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")  # uint8 (H, W): mode "L"


def preprocess_image(image: Image.Image, resolution: int) -> torch.Tensor:
    """Short side to `resolution` (bilinear), centre crop to a square, (3, res, res) float in [-1, 1]."""
    image = to_rgb(image)
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.BILINEAR)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = data.view(resolution, resolution, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids padded and truncated to the tokenizer limit (CLIP: 77 with BOS/EOS)."""
    return tokenizer(list(captions), padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length, return_tensors="pt").input_ids


def check_images(records: Sequence[Record], on_error: str = "skip", progress: bool = True) -> List[Record]:
    """Records whose image opens and decodes; bad ones are reported with their path (and skipped or raised).
    Decodes every file once, so a progress bar shows (progress=False, or fewer than 100 files: none)."""
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    good, bad = [], []
    files = sum(not isinstance(record.image, Image.Image) for record in records)
    for record in tqdm(records, desc="check images", unit="img", disable=not progress or files < 100,
                       dynamic_ncols=True, leave=False):
        if isinstance(record.image, Image.Image):
            good.append(record)
            continue
        path = Path(record.image)
        try:
            if not path.is_file():
                raise FileNotFoundError("file not found")
            with Image.open(path) as handle:
                handle.load()
            good.append(record)
        except Exception as error:  # PIL raises several types for corrupt files
            reason = f"{type(error).__name__}: {error}"
            if on_error == "fail":
                raise ValueError(f"image {path} cannot be read ({reason}); fix or remove it, or pass "
                                 f"--on-bad-image skip") from error
            bad.append((path, reason))
    for path, reason in bad:
        logger.warning("skipping image %s (%s)", path, reason)
    if bad:
        logger.warning("skipped %d of %d images that could not be read", len(bad), len(records))
    return good


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Preprocessed (pixel_values, input_ids, caption) examples of checked records."""

    def __init__(self, records: Sequence[Record], tokenizer, resolution: int, on_error: str = "skip",
                 name: str = "dataset", progress: bool = True):
        self.records = check_images(records, on_error, progress=progress)
        if not self.records:
            raise ValueError(f"{name}: no readable images (of {len(records)} records)")
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.input_ids = tokenize(tokenizer, [r.caption for r in self.records])

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        if isinstance(record.image, Image.Image):
            pixels = preprocess_image(record.image, self.resolution)
        else:
            with Image.open(record.image) as handle:
                pixels = preprocess_image(handle, self.resolution)
        return {"pixel_values": pixels, "input_ids": self.input_ids[index], "caption": record.caption}


# ---------------------------------------------------------------------------- splits
def split_records(records: Sequence[Record], fractions: Sequence[float], seed: int = 42,
                  names: Sequence[str] = ("train", "validation", "test"),
                  groups: Optional[Sequence] = None) -> List[List[Record]]:
    """Shuffles with a fixed seed and cuts by `fractions`; raises ValueError for an empty split.

    groups: one key per record (IU X-Ray: the report uid). Then the distinct keys are shuffled and cut by
    `fractions` (of the number of keys), and each split gets every record of its keys (in input order):
    records sharing a key never land in two splits."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {list(fractions)}")
    if groups is not None:
        return _split_groups(records, fractions, seed, names, groups)
    splits = _shuffled_cut(records, fractions, seed)
    for name, split in zip(names, splits):
        if not split:
            raise ValueError(f"the {name} split is empty: {len(records)} records split by {list(fractions)} "
                             f"gives {[len(s) for s in splits]}; expected at least one record per split "
                             f"(add data or change the fractions)")
    return splits


def _shuffled_cut(items, fractions, seed) -> list:
    """`items` shuffled with `seed` and cut into consecutive parts of the given fractions (the last part takes
    the rounding remainder)."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    parts, start = [], 0
    for i, fraction in enumerate(fractions):
        end = len(shuffled) if i == len(fractions) - 1 else start + round(fraction * len(shuffled))
        parts.append(shuffled[start:end])
        start = end
    return parts


def _split_groups(records, fractions, seed, names, groups) -> List[List[Record]]:
    records, groups = list(records), list(groups)
    if len(groups) != len(records):
        raise ValueError(f"split_records: {len(groups)} group keys for {len(records)} records")
    members = {}
    for record, key in zip(records, groups):
        members.setdefault(key, []).append(record)
    keys = list(members)
    key_splits = _shuffled_cut(keys, fractions, seed)
    splits = [[record for key in part for record in members[key]] for part in key_splits]
    for name, split in zip(names, splits):
        if not split:
            raise ValueError(f"the {name} split is empty: {len(keys)} groups ({len(records)} records) split by "
                             f"{list(fractions)} gives {[len(k) for k in key_splits]} groups; expected at least "
                             f"one group per split (add data or change the fractions)")
    return splits


# ---------------------------------------------------------------------------- captioned folder
def read_jsonl(path) -> List[tuple]:
    """(line number, row) of every non-blank line of a JSON Lines file. A line that is not a JSON object raises
    ValueError naming the file and line (json's own error names neither)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno}); expected "
                                 f"one JSON object per line, e.g. {{\"file_name\": \"0001.png\", \"text\": "
                                 f"\"a caption\"}}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object (file_name, caption), got "
                                 f"{type(row).__name__} {row!r:.60}")
            rows.append((number, row))
    return rows


def caption_rows(source, numbered_rows, columns: Sequence[str]) -> List[dict]:
    """The rows of a metadata file, checked to hold every column in `columns` with a non-null value; an error
    names the file and the line (of the first bad row, with the count of such rows)."""
    if not numbered_rows:
        raise ValueError(f"{source}: no rows")
    first_number, first = numbered_rows[0]
    for column in columns:
        if column not in first:  # most likely the whole file lacks it: the column list helps choose
            raise ValueError(f"{source}:{first_number}: missing column {column!r}; columns found: {list(first)} "
                             f"(choose the caption column with --caption-column)")
    for column in columns:
        missing = [number for number, row in numbered_rows if column not in row]
        null = [number for number, row in numbered_rows if column in row and row[column] is None]
        for lines, what in ((missing, "has no"), (null, "has a null (empty) value in")):
            if lines:
                # a null caption would train on an empty prompt without anyone noticing
                raise ValueError(f"{source}:{lines[0]}: row {what} column {column!r}; expected a "
                                 f"{'caption text' if column != 'file_name' else 'file name'} in every row "
                                 f"({len(lines)} of {len(numbered_rows)} rows lack one, lines {lines[:5]})")
    return [row for _, row in numbered_rows]


def load_folder_records(data_dir, caption_column: str = "text") -> List[Record]:
    """A folder with images and `metadata.jsonl` or `metadata.csv` (columns `file_name` + a caption column).
    Malformed lines and rows without a file name or caption raise ValueError naming the file and line; empty
    captions are kept (unconditional examples) with one warning giving their count."""
    data_dir = Path(data_dir)
    jsonl, csv_path = data_dir / "metadata.jsonl", data_dir / "metadata.csv"
    if jsonl.is_file():
        source = jsonl
        numbered = read_jsonl(jsonl)
    elif csv_path.is_file():
        source = csv_path
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)  # short rows get None (restval): reported as null below
            numbered = [(reader.line_num, row) for row in reader]
    else:
        raise FileNotFoundError(f"{data_dir}: no metadata.jsonl or metadata.csv (expected one, with columns "
                                f"file_name and {caption_column!r})")
    rows = caption_rows(source, numbered, ("file_name", caption_column))
    empty = [number for number, row in numbered if not str(row[caption_column]).strip()]
    if empty:
        logger.warning("%s: %d of %d captions are empty (first at line %d); they train as empty prompts",
                       source, len(empty), len(rows), empty[0])
    return [Record(data_dir / str(row["file_name"]), str(row[caption_column])) for row in rows]


# ---------------------------------------------------------------------------- IU X-Ray
def _find_dir(root: Path, candidates: Sequence[str]) -> Path:
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    raise FileNotFoundError(f"{root}: no image folder; looked for {list(candidates)}")


def load_iu_xray_records(data_dir, return_uids: bool = False):
    """IU X-Ray (Kaggle layout): indiana_reports.csv (uid, findings, ...), indiana_projections.csv
    (uid, filename, projection) and images/images_normalized/. Frontal images, findings as the prompt;
    reports without findings are dropped (counted in the log). return_uids: (records, the report uid of each
    record), to split by report (`load_split_records`)."""
    root = Path(data_dir)
    reports_path, projections_path = root / "indiana_reports.csv", root / "indiana_projections.csv"
    for path in (reports_path, projections_path):
        if not path.is_file():
            raise FileNotFoundError(f"IU X-Ray: {path} not found (expected indiana_reports.csv and "
                                    f"indiana_projections.csv in {root})")
    with open(reports_path, newline="", encoding="utf-8") as handle:
        reports = list(csv.DictReader(handle))
    with open(projections_path, newline="", encoding="utf-8") as handle:
        projections = list(csv.DictReader(handle))
    for name, rows, needed in (("indiana_reports.csv", reports, ("uid", "findings")),
                               ("indiana_projections.csv", projections, ("uid", "filename", "projection"))):
        missing = [c for c in needed if rows and c not in rows[0]]
        if missing:
            raise ValueError(f"IU X-Ray: {root / name} lacks columns {missing}; found {list(rows[0])}")
    image_dir = _find_dir(root, ("images/images_normalized", "images_normalized", "images"))
    findings = {row["uid"]: (row["findings"] or "").strip() for row in reports}
    records, uids, without_findings = [], [], 0
    for row in projections:
        if row["projection"].strip().lower() != "frontal":
            continue
        text = findings.get(row["uid"], "")
        if not text:
            without_findings += 1
            continue
        records.append(Record(image_dir / row["filename"], text))
        uids.append(row["uid"])
    if without_findings:
        logger.info("IU X-Ray: %d frontal images without findings were left out", without_findings)
    return (records, uids) if return_uids else records


# ---------------------------------------------------------------------------- Montgomery County
def parse_montgomery_reading(text: str):
    """(age, gender, findings) from a ClinicalReadings txt: 'Patient's Sex: M', 'Patient's Age: 040Y', text."""
    age = gender = ""
    findings = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        sex = re.match(r"patient'?s\s+sex\s*:\s*(.*)", stripped, re.IGNORECASE)
        years = re.match(r"patient'?s\s+age\s*:\s*(.*)", stripped, re.IGNORECASE)
        if sex:
            gender = sex.group(1).strip()
        elif years:
            digits = re.match(r"0*(\d+)", years.group(1).strip())
            age = digits.group(1) if digits else years.group(1).strip()
        else:
            findings.append(stripped)
    return age, gender, " ".join(findings)


def montgomery_prompt(age: str, gender: str, findings: str) -> str:
    return f"age:{age}, gender:{gender}, findings:{findings}"


def load_montgomery_records(data_dir) -> List[Record]:
    """Montgomery County CXR: CXR_png/*.png with ClinicalReadings/<same stem>.txt."""
    root = Path(data_dir)
    image_dir = _find_dir(root, ("CXR_png", "images"))
    readings_dir = _find_dir(root, ("ClinicalReadings", "readings"))
    records = []
    for image in sorted(image_dir.glob("*.png")):
        reading = readings_dir / f"{image.stem}.txt"
        if not reading.is_file():
            logger.warning("Montgomery: no clinical reading %s for image %s: image left out", reading, image)
            continue
        records.append(Record(image, montgomery_prompt(*parse_montgomery_reading(
            reading.read_text(encoding="utf-8", errors="replace")))))
    if not records:
        raise ValueError(f"Montgomery: no image with a clinical reading under {root} (expected CXR_png/*.png "
                         f"and ClinicalReadings/*.txt)")
    return records


# ---------------------------------------------------------------------------- PatchGastricADC22
# The paper's five subclasses (appendix C.2), 1,000 patches each; matched to captions.csv's `subtype` column
# ignoring case and punctuation.
PATCH_GASTRIC_SUBTYPES = (
    "moderately differentiated tubular adenocarcinoma",
    "well differentiated tubular adenocarcinoma",
    "moderately to poorly differentiated adenocarcinoma",
    "poorly differentiated adenocarcinoma, solid type",
    "poorly differentiated adenocarcinoma, non-solid type",
)
PATCH_GASTRIC_PER_SUBTYPE = 1000
PATCH_SUFFIXES = (".jpg", ".jpeg", ".png")


def _subtype_key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def load_patch_gastric_records(data_dir, subtypes: Sequence[str] = PATCH_GASTRIC_SUBTYPES,
                               per_subtype: int = PATCH_GASTRIC_PER_SUBTYPE, seed: int = 0,
                               return_slides: bool = False):
    """PatchGastricADC22: captions.csv (`id,subtype,text`: one row per whole-slide image) and
    patches_captions/{id}_{hash}.jpg (every patch of a slide shares its caption). `per_subtype` patches of each
    subtype drawn at random (seeded; all of them when fewer, with a warning), the slide's caption as the
    prompt. return_slides: (records, the slide id of each record), to split by slide (`load_split_records`)."""
    root = Path(data_dir)
    captions_path = root / "captions.csv"
    if not captions_path.is_file():
        raise FileNotFoundError(f"PatchGastricADC22: {captions_path} not found (expected captions.csv with columns "
                                f"id, subtype, text and a patches_captions/ folder in {root})")
    with open(captions_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    missing = [c for c in ("id", "subtype", "text") if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"PatchGastricADC22: {captions_path} lacks columns {missing or ['id', 'subtype', 'text']}"
                         f"; found {list(rows[0]) if rows else 'no rows'}")
    patch_dir = _find_dir(root, ("patches_captions", "patches"))
    patches = {}
    for path in sorted(patch_dir.iterdir()):
        if path.suffix.lower() in PATCH_SUFFIXES:
            patches.setdefault(path.stem.rpartition("_")[0], []).append(path)
    wanted = {_subtype_key(s): s for s in subtypes}
    by_subtype = {key: [] for key in wanted}
    for line, row in enumerate(rows, start=2):
        key = _subtype_key(row["subtype"] or "")
        text = (row["text"] or "").strip()
        if key not in by_subtype:
            continue
        if not text:
            raise ValueError(f"PatchGastricADC22: {captions_path}:{line}: slide {row['id']!r} has no caption")
        by_subtype[key].extend((path, text, row["id"]) for path in patches.get(row["id"], []))
    empty = [wanted[k] for k, items in by_subtype.items() if not items]
    if empty:
        found = sorted({row["subtype"] for row in rows})
        raise ValueError(f"PatchGastricADC22: no patches of subtypes {empty} under {patch_dir}; captions.csv has "
                         f"subtypes {found[:8]}")
    records, slides = [], []
    for index, (key, items) in enumerate(by_subtype.items()):
        if len(items) < per_subtype:
            logger.warning("PatchGastricADC22: %s has %d patches (< %d): all used", wanted[key], len(items),
                           per_subtype)
        chosen = random.Random(seed * 1_000_003 + index).sample(items, min(per_subtype, len(items)))
        for path, text, slide in sorted(chosen, key=lambda item: str(item[0])):
            records.append(Record(path, text))
            slides.append(slide)
    return (records, slides) if return_slides else records
