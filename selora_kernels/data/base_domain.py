"""The generic synthetic domain the tiny base pipeline is pre-trained on (made in memory, deterministic).

Coloured and grayscale scenes: a background (solid, gradient, stripes, checkerboard, noise or a "horizon"
of sky over ground) with one or two shapes (circle, ellipse, square, triangle, ring) of a named colour, size
and position, sometimes blurred or grainy. The caption states exactly those properties, so the text encoder
learns to condition on them. A colour name covers a range of tones (a jittered palette colour, a band of grey
levels), so the VAE learns colour and grey level as continuous quantities rather than a dozen memorised
points; half the scenes are grayscale. Nothing here looks like a chest radiograph on purpose: fine-tuning has
to teach that.
"""
from __future__ import annotations

import random
from typing import List

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .records import Record

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 215, 50),
    "orange": (240, 140, 30), "purple": (140, 60, 180), "white": (240, 240, 240), "gray": (128, 128, 128),
    "black": (15, 15, 15), "brown": (120, 80, 40), "pink": (240, 150, 190), "cyan": (60, 200, 210),
    "silver": (192, 192, 192), "charcoal": (64, 64, 64),
}
# grey names -> their band of grey levels (grayscale scenes draw from these five only)
GREY_BANDS = {"white": (215, 255), "silver": (160, 214), "gray": (100, 159), "charcoal": (45, 99), "black": (0, 44)}
COLOUR_JITTER = 25  # per channel, around the palette colour
SHAPES = ("circle", "ellipse", "square", "triangle", "ring")
SIZES = {"small": 0.18, "medium": 0.28, "large": 0.4}  # radius as a fraction of the image side
POSITIONS = {"on the left": (0.3, 0.5), "on the right": (0.7, 0.5), "at the top": (0.5, 0.3),
             "at the bottom": (0.5, 0.7), "in the center": (0.5, 0.5)}
BACKGROUNDS = ("solid", "solid", "solid", "gradient", "gradient", "stripes", "checkerboard", "noise", "horizon")
GRAYSCALE_SHARE = 0.5  # the VAE learned grey tones (no colour tint) only with many grayscale scenes
GRAIN_SHARE, GRAIN_STD = 0.3, 8.0

# whole-word BPE merges for the captions (the tiny tokenizer otherwise spells these byte by byte)
BASE_DOMAIN_WORDS = tuple(dict.fromkeys(
    list(COLOURS) + list(SHAPES) + list(SIZES) + "on in at top bottom center background gradient striped stripes "
    "checkerboard noisy sky over ground grayscale blurred grainy photo of and two".split()))


def _tone(rng: random.Random, name: str, grayscale: bool) -> np.ndarray:
    """One RGB tone (float) of colour `name`: a grey level in its band, or the palette colour jittered."""
    if grayscale:
        level = rng.randint(*GREY_BANDS[name])
        return np.array((level, level, level), float)
    jitter = [rng.uniform(-COLOUR_JITTER, COLOUR_JITTER) for _ in range(3)]
    return np.clip(np.array(COLOURS[name], float) + jitter, 0, 255)


def _background(rng: random.Random, size: int, colours: List[str], grayscale: bool):
    """(PIL RGB image, caption phrase) of one background."""
    kind = rng.choice(BACKGROUNDS)
    first = rng.choice(colours)
    a = _tone(rng, first, grayscale)
    if kind == "solid":
        return Image.new("RGB", (size, size), tuple(int(v) for v in a)), f"on a {first} background"
    second = rng.choice([c for c in colours if c != first])
    b = _tone(rng, second, grayscale)
    if kind == "gradient":
        t = np.linspace(0, 1, size)[:, None, None]
        pixels = np.broadcast_to(a * (1 - t) + b * t, (size, size, 3))
        return Image.fromarray(pixels.astype(np.uint8)), f"on a {first} and {second} gradient background"
    if kind == "horizon":
        sky, ground = rng.choice(["blue", "cyan", "white", "gray"]), rng.choice(["green", "brown", "yellow"])
        row = rng.randint(size // 3, 2 * size // 3)
        pixels = np.empty((size, size, 3))
        t = np.linspace(0.7, 1.0, row)[:, None, None]
        pixels[:row] = np.array(COLOURS[sky], float) * t
        pixels[row:] = COLOURS[ground]
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), f"{sky} sky over {ground} ground"
    yy, xx = np.mgrid[:size, :size]
    period = rng.choice([8, 12, 16])
    if kind == "stripes":
        mask = ((xx if rng.random() < 0.5 else yy) // period) % 2 == 0
        phrase = f"on a {first} and {second} striped background"
    elif kind == "checkerboard":
        mask = ((xx // period) + (yy // period)) % 2 == 0
        phrase = f"on a {first} and {second} checkerboard background"
    else:  # noise: a seeded generator per image keeps the set deterministic
        noise = np.random.default_rng(rng.randrange(2**31)).random((size // 8, size // 8))
        mask = np.kron(noise, np.ones((8, 8))) < 0.5
        phrase = f"on a noisy {first} and {second} background"
    pixels = np.where(mask[..., None], a, b)
    return Image.fromarray(pixels.astype(np.uint8)), phrase


def _shape(draw: ImageDraw.ImageDraw, rng: random.Random, size: int, colours: List[str], grayscale: bool) -> str:
    shape, colour = rng.choice(SHAPES), rng.choice(colours)
    size_name, position = rng.choice(list(SIZES)), rng.choice(list(POSITIONS))
    radius = SIZES[size_name] * size
    cx, cy = (p * size + rng.uniform(-0.04, 0.04) * size for p in POSITIONS[position])
    fill = tuple(int(v) for v in _tone(rng, colour, grayscale))
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "ellipse":
        draw.ellipse([cx - 0.6 * radius, cy - radius, cx + 0.6 * radius, cy + radius], fill=fill)
    elif shape == "square":
        r = 0.85 * radius
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + 0.8 * radius), (cx + radius, cy + 0.8 * radius)],
                     fill=fill)
    else:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=fill,
                     width=max(2, int(radius / 3)))
    return f"a {size_name} {colour} {shape} {position}"


def generic_image(rng: random.Random, size: int = 64):
    """(PIL RGB image, caption) of one generic scene."""
    grayscale = rng.random() < GRAYSCALE_SHARE
    colours = list(GREY_BANDS) if grayscale else [c for c in COLOURS if c not in ("silver", "charcoal")]
    image, background = _background(rng, size, colours, grayscale)
    draw = ImageDraw.Draw(image)
    shapes = [_shape(draw, rng, size, colours, grayscale) for _ in range(1 if rng.random() < 0.7 else 2)]
    caption = " and ".join(shapes) + " " + background
    if rng.random() < 0.35:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.8, 2.0) * size / 64))
        caption += ", blurred"
    if rng.random() < GRAIN_SHARE:  # film-like grain from a seeded generator per image
        grain = np.random.default_rng(rng.randrange(2**31)).normal(0, GRAIN_STD, (size, size, 1))
        image = Image.fromarray((np.asarray(image, float) + grain).clip(0, 255).astype(np.uint8))
        caption += ", grainy"
    if grayscale:
        image = image.convert("L").convert("RGB")
        caption = "grayscale photo of " + caption
    return image, caption


def generic_records(count: int = 512, size: int = 64, seed: int = 0) -> List[Record]:
    """`count` records, identical for the same (count, size, seed)."""
    rng = random.Random(seed)
    return [Record(*generic_image(rng, size)) for _ in range(count)]
