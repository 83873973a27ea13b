"""A small deterministic "chest X-ray-like" dataset made in memory (no files, no downloads).

Each grayscale image has a bright body outline, two dark lungs, a heart shadow whose width encodes
cardiomegaly, and optionally an opacity in one lower lobe or a blunted costophrenic angle (effusion); the
caption states exactly those findings, so text conditioning carries real information.
"""
from __future__ import annotations

import random
from typing import List

from PIL import Image, ImageDraw, ImageFilter

from .records import Record


def synthetic_xray(rng: random.Random, size: int):
    """(PIL image, caption) of one synthetic radiograph."""
    scale = size / 64
    image = Image.new("L", (size, size), 10)
    draw = ImageDraw.Draw(image)
    draw.ellipse([6 * scale, 4 * scale, 58 * scale, 66 * scale], fill=170 + rng.randint(-15, 15))  # body
    for left in (12, 35):  # lungs
        draw.ellipse([left * scale, 10 * scale, (left + 17) * scale, 54 * scale], fill=45 + rng.randint(-10, 10))
    enlarged = rng.random() < 0.4
    half_width = (12 if enlarged else 7) * scale
    centre = 33 * scale
    draw.ellipse([centre - half_width, 30 * scale, centre + half_width, 52 * scale], fill=150)  # heart
    findings = ["cardiomegaly" if enlarged else "the heart size is normal"]
    kind = rng.choice(["clear", "clear", "opacity", "effusion"])
    side = rng.choice(["right", "left"])
    x0 = 14 if side == "right" else 37  # radiographs show the patient's right on the left
    if kind == "opacity":
        draw.ellipse([(x0 + 2) * scale, 36 * scale, (x0 + 11) * scale, 46 * scale], fill=130)
        findings.append(f"focal opacity in the {side} lower lobe")
    elif kind == "effusion":
        draw.rectangle([x0 * scale, 46 * scale, (x0 + 17) * scale, 56 * scale], fill=140)
        findings.append(f"small {side} pleural effusion")
    else:
        findings.append("lungs are clear no pleural effusion or pneumothorax")
    image = image.filter(ImageFilter.GaussianBlur(radius=1.2 * scale))
    noise = Image.frombytes("L", (size, size), bytes(rng.randrange(256) for _ in range(size * size)))
    image = Image.blend(image, noise, 0.06)  # film grain, drawn from the seeded generator
    return image, "chest x-ray frontal view, " + ", ".join(findings)


def synthetic_records(count: int = 24, size: int = 64, seed: int = 0) -> List[Record]:
    """`count` records, identical for the same (count, size, seed)."""
    if count < 2:
        raise ValueError(f"synthetic dataset needs at least 2 images (train + validation), got {count}")
    rng = random.Random(seed)
    return [Record(*synthetic_xray(rng, size)) for _ in range(count)]
