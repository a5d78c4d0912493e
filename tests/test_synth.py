"""Synthetic dataset generator: files, readability, voices, candidates, determinism, content."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from transresnet.data import load_dataset
from transresnet.synth import (
    BACKGROUNDS,
    COLORS,
    COUNTS,
    NUM_CONTENT_COMBOS,
    SHAPES,
    SIZES,
    VOICE_TEMPLATES,
    VOICES,
    ImageAttributes,
    generate_synthetic_dataset,
    render_caption,
    render_image,
)

N = 30
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    csv_path = generate_synthetic_dataset(out, N, seed=3, num_candidates=50)
    assert csv_path == out / "captions.csv"
    return out


def _attributes(out: Path) -> dict[str, ImageAttributes]:
    with (out / "attributes.csv").open(newline="") as handle:
        return {
            row["image"]: ImageAttributes(row["shape"], row["color"], int(row["count"]), row["size"],
                                          row["background"])
            for row in csv.DictReader(handle)
        }


def test_files_written(synth_dir: Path) -> None:
    images = sorted((synth_dir / "images").glob("*.jpg"))
    assert [p.name for p in images] == [f"synth_{i:06d}.jpg" for i in range(N)]
    with Image.open(images[0]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    assert (synth_dir / "personalities.txt").read_text().split("\n")[:-1] == list(VOICES)
    assert not list(synth_dir.rglob("*.tmp"))
    assert {p.name for p in synth_dir.iterdir()} >= {"captions.csv", "val.json", "test.json", "attributes.csv"}


def test_voices_are_real_traits() -> None:
    assert len(VOICES) >= 10 and all(len(VOICE_TEMPLATES[v]) >= 2 for v in VOICES)
    traits_file = SHARED / "data" / "personality-captions" / "personalities.txt"
    if not traits_file.is_file():
        pytest.skip(f"trait list not available at {traits_file}")
    traits = {line.split("(")[0].strip() for line in traits_file.read_text().splitlines()}
    assert set(VOICES) <= traits


def test_csv_loads_with_one_distinct_caption_per_voice(synth_dir: Path) -> None:
    ds = load_dataset(synth_dir / "captions.csv")
    assert ds.skipped.total == 0 and len(ds) == N * len(VOICES)
    by_image: dict[str, dict[str, str]] = defaultdict(dict)
    for r in ds.records:
        assert r.personality not in by_image[r.image_id]  # one caption per voice
        by_image[r.image_id][r.personality] = r.caption
    assert len(by_image) == N
    for captions in by_image.values():
        assert sorted(captions) == sorted(VOICES)
        assert len(set(captions.values())) == len(VOICES)
    assert {r.split for r in ds.records} == {"train", "val", "test"}
    assert len(set(ds.image_ids())) == N


def test_captions_name_the_image_content(synth_dir: Path) -> None:
    attrs = _attributes(synth_dir)
    for r in load_dataset(synth_dir / "captions.csv").records:
        a = attrs[r.image_id]
        text = r.caption.lower()
        for word in (COUNTS[a.count], a.size, a.color, a.shape, a.background):
            assert word in text, (word, r.caption)


@pytest.mark.parametrize("split", ["val", "test"])
def test_candidate_json_readable_with_gold_once_and_hard_negatives(synth_dir: Path, split: str) -> None:
    ds = load_dataset(synth_dir / f"{split}.json")
    csv_ds = load_dataset(synth_dir / "captions.csv", split=split)
    assert ds.skipped.total == 0 and len(ds) == len(csv_ds) > 0
    same_image: dict[str, set[str]] = defaultdict(set)
    for r in csv_ds.records:
        same_image[r.image_id].add(r.caption)
    attrs = _attributes(synth_dir)
    for r in ds.records:
        assert r.split == split and r.personality in VOICES
        assert r.candidates is not None and len(r.candidates) == 50
        assert len(set(r.candidates)) == 50
        assert r.candidates.count(r.caption) == 1
        assert same_image[r.image_id] <= set(r.candidates)  # the image's other voices are negatives
        # No negative describes the same content as the gold image (that would be a second answer).
        a = attrs[r.image_id]
        phrase = f"{COUNTS[a.count]} {a.size} {a.color} {a.shape}"
        same_content = [c for c in r.candidates if phrase in c.lower() and f"{a.background} " in c]
        assert set(same_content) == same_image[r.image_id]
    assert len({r.candidates.index(r.caption) for r in ds.records}) > 1  # shuffled: gold not at a fixed place


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    def digest(out: Path) -> dict[str, str]:
        return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file()}

    a = digest(generate_synthetic_dataset(tmp_path / "a", 12, seed=7, num_candidates=20).parent)
    b = digest(generate_synthetic_dataset(tmp_path / "b", 12, seed=7, num_candidates=20).parent)
    c = digest(generate_synthetic_dataset(tmp_path / "c", 12, seed=8, num_candidates=20).parent)
    assert a == b
    assert a["captions.csv"] != c["captions.csv"]


def test_different_content_gives_different_captions_in_every_voice() -> None:
    base = ImageAttributes("star", "red", 2, "big", "white")
    variants = [replace(base, shape=s) for s in SHAPES] + [replace(base, color=c) for c in COLORS] + [
        replace(base, count=n) for n in COUNTS] + [replace(base, size=s) for s in SIZES] + [
        replace(base, background=b) for b in BACKGROUNDS]
    for voice in VOICES:
        for t in range(len(VOICE_TEMPLATES[voice])):
            for x, y in itertools.combinations(set(variants), 2):
                assert render_caption(x, voice, t) != render_caption(y, voice, t), (voice, t, x, y)
    assert NUM_CONTENT_COMBOS >= 500


def test_different_images_in_the_dataset_differ_per_voice(synth_dir: Path) -> None:
    attrs = _attributes(synth_dir)
    captions: dict[tuple[str, str], str] = {
        (r.image_id, r.personality): r.caption for r in load_dataset(synth_dir / "captions.csv").records}
    for (i1, a1), (i2, a2) in itertools.combinations(attrs.items(), 2):
        if a1 != a2:
            for voice in VOICES:
                assert captions[i1, voice] != captions[i2, voice]


def test_images_show_their_content() -> None:
    # The shape colour dominates the non-background pixels; a bigger/more-numerous shape covers more.
    rng = random.Random(0)
    small = render_image(ImageAttributes("square", "blue", 1, "small", "white"), rng, 64)
    big = render_image(ImageAttributes("square", "blue", 4, "big", "white"), rng, 64)

    def blue_pixels(im: Image.Image) -> int:
        return sum(1 for r, g, b in im.getdata() if b > 150 and r < 100)

    assert 50 < blue_pixels(small) < blue_pixels(big)
    red = render_image(ImageAttributes("circle", "red", 2, "big", "black"), rng, 64)
    assert blue_pixels(red) == 0


def test_small_split_still_fills_candidates(tmp_path: Path) -> None:
    generate_synthetic_dataset(tmp_path, 5, seed=1, num_candidates=100)
    records = json.loads((tmp_path / "test.json").read_text())
    assert len(records) == len(VOICES)
    for rec in records:
        assert len(rec["candidates"]) == 100 == len(set(rec["candidates"]))
        assert rec["candidates"].count(rec["comment"]) == 1
        assert rec["additional_comments"] == [] and rec["image_hash"].startswith("synth_")


def test_bad_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_images"):
        generate_synthetic_dataset(tmp_path, 0)
    with pytest.raises(ValueError, match="sum to less than 1"):
        generate_synthetic_dataset(tmp_path, 10, val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="unknown voice"):
        render_caption(ImageAttributes("star", "red", 1, "big", "white"), "Grumpy")
