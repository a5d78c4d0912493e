"""Synthetic personality-caption data: procedurally drawn images with one caption per voice.

Each image shows 1-4 shapes of one kind, colour and size on one of a few backgrounds. Each of ten
personality voices (trait names from Personality-Captions) describes that content in its own wording,
so ranking the right caption needs both the image (which content) and the trait (which voice). The
voices are defined once, in :mod:`transresnet.voices` (which also voices real captions).

Layout of ``out_dir``::

    images/synth_000000.jpg ...   the images
    captions.csv                  image,split,caption,personality (one row per image and voice)
    attributes.csv                image,split,shape,color,count,size,background
    personalities.txt             the voices, one per line
    val.json, test.json           Personality-Captions JSON with per-record candidate lists
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from transresnet.files import write_text_atomic
from transresnet.voices import (  # noqa: F401  (VOICE_TEMPLATES: re-exported for callers of this module)
    VOICE_TEMPLATES,
    VOICES,
    atomic_write_csv,
    num_templates,
    template_for,
)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Content vocabulary
# --------------------------------------------------------------------------------------------------

SHAPES: dict[str, str] = {  # singular -> plural
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "diamond": "diamonds",
    "cross": "crosses",
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 220, 30),
    "green": (30, 160, 60),
    "blue": (30, 80, 220),
    "purple": (150, 50, 200),
}
COUNTS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
SIZES: dict[str, float] = {"small": 0.10, "big": 0.18}  # shape radius as a fraction of the image side
BACKGROUNDS = ("white", "black", "striped", "checkered")

NUM_CONTENT_COMBOS = len(SHAPES) * len(COLORS) * len(COUNTS) * len(SIZES) * len(BACKGROUNDS)  # 1152



@dataclass(frozen=True)
class ImageAttributes:
    """What an image shows; every field is named in each of its captions."""

    shape: str  # a key of SHAPES
    color: str  # a key of COLORS
    count: int  # 1..4
    size: str  # a key of SIZES
    background: str  # one of BACKGROUNDS


def sample_attributes(rng: random.Random) -> ImageAttributes:
    """Draw content uniformly at random."""
    return ImageAttributes(
        shape=rng.choice(list(SHAPES)),
        color=rng.choice(list(COLORS)),
        count=rng.choice(list(COUNTS)),
        size=rng.choice(list(SIZES)),
        background=rng.choice(BACKGROUNDS),
    )


def render_caption(attrs: ImageAttributes, voice: str, template_index: int = 0) -> str:
    """The caption of ``attrs`` in ``voice`` using that voice's template number ``template_index``."""
    template = template_for(voice, template_index)
    shape = attrs.shape if attrs.count == 1 else SHAPES[attrs.shape]
    things = f"{COUNTS[attrs.count]} {attrs.size} {attrs.color} {shape}"
    return template.synthetic.format(
        things=things,
        Things=things[0].upper() + things[1:],
        bg=attrs.background,
    )


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def render_image(attrs: ImageAttributes, rng: random.Random, image_size: int = 64) -> Image.Image:
    """Draw ``attrs``: shapes placed in distinct cells of a 2x2 grid, jittered within their cell."""
    image = _background(attrs.background, image_size)
    draw = ImageDraw.Draw(image)
    radius = max(2.0, SIZES[attrs.size] * image_size)
    cell = image_size / 2
    slack = max(0.0, cell / 2 - radius - 1)
    for slot in rng.sample(range(4), attrs.count):
        cx = (slot % 2 + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (slot // 2 + 0.5) * cell + rng.uniform(-slack, slack)
        _draw_shape(draw, attrs.shape, cx, cy, radius, _jitter_color(COLORS[attrs.color], rng))
    return image


def _background(kind: str, size: int) -> Image.Image:
    if kind == "white":
        return Image.new("RGB", (size, size), (245, 245, 245))
    if kind == "black":
        return Image.new("RGB", (size, size), (20, 20, 20))
    step = max(2, size // 8)
    if kind == "striped":
        image = Image.new("RGB", (size, size), (200, 200, 200))
        draw = ImageDraw.Draw(image)
        for y in range(0, size, 2 * step):
            draw.rectangle([0, y, size - 1, y + step - 1], fill=(110, 110, 110))
        return image
    if kind == "checkered":
        image = Image.new("RGB", (size, size), (225, 225, 225))
        draw = ImageDraw.Draw(image)
        for y in range(0, size, step):
            for x in range((y // step) % 2 * step, size, 2 * step):
                draw.rectangle([x, y, x + step - 1, y + step - 1], fill=(80, 80, 80))
        return image
    raise ValueError(f"unknown background {kind!r}; valid backgrounds: {', '.join(BACKGROUNDS)}")


def _jitter_color(rgb: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)
    return r, g, b


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(cx, cy, r), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill)
    elif shape == "cross":
        t = max(1.0, r * 0.33)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")


def _star_points(cx: float, cy: float, r: float, points: int = 5) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / points
        out.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return out


# --------------------------------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SynthImage:
    image_id: str  # "synth_000123"
    split: str
    attrs: ImageAttributes
    captions: dict[str, str]  # voice -> caption


def generate_synthetic_dataset(
    out_dir: Path,
    num_images: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    num_candidates: int = 100,
) -> Path:
    """Write a synthetic personality-caption dataset into ``out_dir``; return the path of its CSV.

    Deterministic for a given seed. ``captions.csv`` is written last, under a temporary name renamed
    into place, so a crash never leaves a CSV that looks complete.
    """
    _check_arguments(num_images, image_size, val_fraction, test_fraction, num_candidates)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    splits = _assign_splits(num_images, seed, val_fraction, test_fraction)
    width = max(6, len(str(num_images - 1)))
    images = []
    for index in range(num_images):
        image_id = f"synth_{index:0{width}d}"
        rng = random.Random(f"transresnet-synth:{seed}:{index}")
        images.append(_make_image(out_dir / "images", image_id, splits[index], rng, image_size))

    write_text_atomic(out_dir / "personalities.txt", "".join(f"{v}\n" for v in VOICES))
    atomic_write_csv(out_dir / "attributes.csv", ["image", "split", "shape", "color", "count", "size", "background"],
               ([f"{im.image_id}.jpg", im.split, *astuple(im.attrs)] for im in images))
    for split in ("val", "test"):
        records = _candidate_records([im for im in images if im.split == split], num_candidates, seed)
        write_text_atomic(out_dir / f"{split}.json", json.dumps(records, indent=1))
    csv_path = out_dir / "captions.csv"
    atomic_write_csv(csv_path, ["image", "split", "caption", "personality"],
               ([f"{im.image_id}.jpg", im.split, caption, voice]
                for im in images for voice, caption in im.captions.items()))

    counts = {s: sum(im.split == s for im in images) for s in ("train", "val", "test")}
    logger.info("wrote %d synthetic images (train %d, val %d, test %d), %d captions in %d voices to %s",
                num_images, counts["train"], counts["val"], counts["test"], num_images * len(VOICES),
                len(VOICES), out_dir)
    return csv_path


def _check_arguments(num_images: int, image_size: int, val_fraction: float, test_fraction: float,
                     num_candidates: int) -> None:
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must each lie in [0, 1) "
            "and sum to less than 1"
        )
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be at least 1, got {num_candidates}")


def _assign_splits(num_images: int, seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    """Split labels per image index: a seeded shuffle, at least one val/test image when asked for any."""
    def share(fraction: float) -> int:
        return max(1, round(num_images * fraction)) if fraction > 0 and num_images >= 3 else 0

    n_val, n_test = share(val_fraction), share(test_fraction)
    order = list(range(num_images))
    random.Random(f"transresnet-synth-splits:{seed}").shuffle(order)
    splits = ["train"] * num_images
    for position, index in enumerate(order):
        if position < n_test:
            splits[index] = "test"
        elif position < n_test + n_val:
            splits[index] = "val"
    return splits


def _make_image(folder: Path, image_id: str, split: str, rng: random.Random, image_size: int) -> _SynthImage:
    attrs = sample_attributes(rng)
    image = render_image(attrs, rng, image_size)
    tmp = folder / f".{image_id}.jpg.tmp"
    image.save(tmp, format="JPEG", quality=90, subsampling=0)
    os.replace(tmp, folder / f"{image_id}.jpg")
    captions = {v: render_caption(attrs, v, rng.randrange(num_templates(v))) for v in VOICES}
    return _SynthImage(image_id=image_id, split=split, attrs=attrs, captions=captions)


def _candidate_records(images: Sequence[_SynthImage], num_candidates: int, seed: int) -> list[dict[str, Any]]:
    """Personality-Captions records: gold + the image's other voices + other images' captions, shuffled."""
    pool = [(im.attrs, caption) for im in images for caption in im.captions.values()]
    records = []
    for im in images:
        for voice, gold in im.captions.items():
            rng = random.Random(f"transresnet-synth-candidates:{seed}:{im.image_id}:{voice}")
            candidates = _candidates(im, gold, pool, num_candidates, rng)
            records.append({
                "image_hash": im.image_id,
                "personality": voice,
                "comment": gold,
                "candidates": candidates,
                "additional_comments": [],
            })
    return records


def _candidates(im: _SynthImage, gold: str, pool: Sequence[tuple[ImageAttributes, str]], n: int,
                rng: random.Random) -> list[str]:
    """``n`` distinct captions, gold first then hard negatives, before the final shuffle.

    Negatives never describe the same content as the gold image (another image with identical
    attributes would make a second correct answer).
    """
    chosen = dict.fromkeys([gold, *(c for c in im.captions.values() if c != gold)])
    chosen = dict.fromkeys(list(chosen)[:n])
    others = [caption for attrs, caption in pool if attrs != im.attrs]
    _extend_unique(chosen, rng.sample(others, min(len(others), 2 * (n - len(chosen)))), n)
    if len(chosen) < n:
        _extend_unique(chosen, rng.sample(others, len(others)), n)
    attempts = 0
    while len(chosen) < n and attempts < 100 * n:  # split too small: invent captions of unseen content
        attempts += 1
        voice, attrs = rng.choice(VOICES), sample_attributes(rng)
        if attrs != im.attrs:
            _extend_unique(chosen, [render_caption(attrs, voice, rng.randrange(num_templates(voice)))], n)
    candidates = list(chosen)
    rng.shuffle(candidates)
    return candidates


def _extend_unique(chosen: dict[str, None], captions: Iterable[str], n: int) -> None:
    for caption in captions:
        if len(chosen) >= n:
            return
        chosen.setdefault(caption, None)
