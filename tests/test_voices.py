"""Voices: one set of templates for synthetic and real captions; ``transresnet data voices`` datasets."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import pytest

from tests.helpers import shared_path, write_image
from transresnet.cli import main
from transresnet.data import load_dataset
from transresnet.synth import ImageAttributes, render_caption
from transresnet.voices import (
    VOICE_TEMPLATES,
    VOICES,
    num_templates,
    parse_template,
    template_for,
    voice_caption,
    write_voiced_dataset,
)

CAPTIONS = {  # photo -> (split, captions)
    **{f"train{i}.jpg": ("train", [f"A dog number {i} runs on the beach .", f"Dog {i} plays in the sand"])
       for i in range(6)},
    **{f"val{i}.jpg": ("val", [f"Two kids {i} ride bikes down a street .", f"Children {i} cycling!"])
       for i in range(3)},
    **{f"test{i}.jpg": ("test", [f"A red car {i} parked by a lake .", f"The car {i} near water ."])
       for i in range(3)},
}


def _write_source(root: Path, image_dir: str = "images") -> Path:
    for seed, name in enumerate(CAPTIONS):
        write_image(root / image_dir / name, seed=seed)
    path = root / "captions.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "split", "caption"])
        for name, (split, captions) in CAPTIONS.items():
            writer.writerows([name, split, caption] for caption in captions)
    return path


@pytest.fixture(scope="module")
def voiced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("voices")
    csv_path = write_voiced_dataset(_write_source(root / "src"), root / "out", seed=1, num_candidates=40)
    assert csv_path == root / "out" / "captions.csv"
    return root / "out"


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_template_marks_one_scene_and_synthetic_captions_use_it() -> None:
    for voice in VOICES:
        assert num_templates(voice) == len(VOICE_TEMPLATES[voice]) >= 2
        for t in range(num_templates(voice)):
            template = template_for(voice, t)
            assert "[" not in template.synthetic and "{things}" in template.scene.lower()
            attrs = ImageAttributes("star", "red", 2, "big", "white")
            assert render_caption(attrs, voice, t).startswith(template.prefix)
            assert render_caption(attrs, voice, t).endswith(template.suffix)
    with pytest.raises(ValueError, match="exactly one scene"):
        parse_template("no scene here")
    with pytest.raises(ValueError, match="exactly one scene"):
        parse_template("[one] and [two]")


def test_voice_caption_wraps_real_text() -> None:
    assert voice_caption("A dog runs on the beach .", "Sarcastic", 0) == \
        "Oh wow, a dog runs on the beach. Truly groundbreaking art."
    assert voice_caption("a dog runs on the beach", "Cheerful", 0) == \
        "Yay! A dog runs on the beach, what a fun day!"
    assert voice_caption("  A   dog runs!! ", "Romantic", 0).startswith("A dog runs, as lovely as")
    assert voice_caption("I see the UK", "Sweet", 0).startswith("Aww, I see the UK, ")
    assert voice_caption("UK streets at night", "Sweet", 0).startswith("Aww, UK streets")
    assert voice_caption("A dog", "Angry", 3) == voice_caption("A dog", "Angry", 0)  # index wraps
    texts = {voice_caption("A dog runs .", v, t) for v in VOICES for t in range(num_templates(v))}
    assert len(texts) == sum(num_templates(v) for v in VOICES)  # every template says it differently
    assert all("dog runs" in text for text in texts)
    with pytest.raises(ValueError, match="unknown voice 'Grumpy'"):
        voice_caption("A dog", "Grumpy")
    with pytest.raises(ValueError, match="empty caption"):
        voice_caption(" . ", "Sweet")


def test_csv_has_every_caption_in_every_voice_and_loads(voiced: Path) -> None:
    ds = load_dataset(voiced / "captions.csv")
    assert ds.skipped.total == 0
    assert len(ds) == sum(len(c) for _, c in CAPTIONS.values()) * len(VOICES)
    assert (voiced / "personalities.txt").read_text().splitlines() == list(VOICES)
    by_photo: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in ds.records:
        assert r.image_path.is_file() and r.split == CAPTIONS[r.image_id][0]
        by_photo[r.image_id][r.personality].append(r.caption)
    for name, (_, captions) in CAPTIONS.items():
        assert sorted(by_photo[name]) == sorted(VOICES)
        for voice, texts in by_photo[name].items():
            assert len(texts) == len(captions)
            prefixes = {template_for(voice, i).prefix for i in range(num_templates(voice))}
            assert all(any(t.startswith(prefix) for prefix in prefixes) for t in texts)
            for text, source in zip(texts, captions, strict=True):  # CSV rows keep the source order
                core = source.rstrip(" .!").lower()
                assert core in text.lower(), (core, text)
    assert not list(voiced.glob(".*"))  # no staging folder or temp file left


def test_images_are_links_to_the_source_photos(voiced: Path) -> None:
    src = voiced.parent / "src" / "images"
    for name in CAPTIONS:
        link = voiced / "images" / name
        assert link.resolve() == (src / name).resolve()
        assert link.read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize("split", ["val", "test"])
def test_candidate_files_hold_the_gold_and_its_other_voices(voiced: Path, split: str) -> None:
    ds = load_dataset(voiced / f"{split}.json")
    photos = [n for n, (s, _) in CAPTIONS.items() if s == split]
    assert ds.skipped.total == 0 and len(ds) == len(photos) * len(VOICES)
    csv_rows = load_dataset(voiced / "captions.csv").records
    voices_of = {r.caption: r.personality for r in csv_rows}
    photo_of = {r.caption: r.image_id for r in csv_rows}
    golds_per_photo: dict[str, set[str]] = defaultdict(set)
    for r in ds.records:
        assert r.split == split and r.personality in VOICES and voices_of[r.caption] == r.personality
        assert r.candidates is not None and len(r.candidates) == 40 == len(set(r.candidates))
        assert r.candidates.count(r.caption) == 1
        same_photo = [c for c in r.candidates if photo_of.get(c) == r.image_id]
        assert len(same_photo) == len(VOICES)  # the gold's caption in every voice, nothing else of the photo
        assert sorted(voices_of[c] for c in same_photo) == sorted(VOICES)
        assert all(c in photo_of for c in r.candidates)  # negatives are real voiced captions of other photos
        golds_per_photo[r.image_id].add(r.caption)
    assert all(len(golds) == len(VOICES) for golds in golds_per_photo.values())
    assert len({r.candidates.index(r.caption) for r in ds.records}) > 1  # shuffled


def test_deterministic_for_a_seed_and_rerun_in_place(tmp_path: Path) -> None:
    source = _write_source(tmp_path / "src")
    write_voiced_dataset(source, tmp_path / "a", seed=4, num_candidates=20)
    write_voiced_dataset(source, tmp_path / "b", seed=4, num_candidates=20)
    write_voiced_dataset(source, tmp_path / "c", seed=5, num_candidates=20)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a")["captions.csv"] != _digest(tmp_path / "c")["captions.csv"]
    write_voiced_dataset(source, tmp_path / "a", seed=5, num_candidates=20)  # over an existing output
    assert _digest(tmp_path / "a") == _digest(tmp_path / "c")


def test_other_image_folders_and_formats_get_jpg_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_image(tmp_path / "photos" / "sub" / "a.png", seed=1)
    write_image(tmp_path / "photos" / "b.jpg", seed=2)
    source = tmp_path / "list.csv"
    source.write_text("image,split,caption\nsub/a.png,val,A cat sleeps .\nb.jpg,val,A bird flies .\n")
    write_voiced_dataset(source, tmp_path / "out", image_dir=tmp_path / "photos", num_candidates=25)
    names = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert names == ["b.jpg", "sub__a.png.jpg"]
    ds = load_dataset(tmp_path / "out" / "val.json")
    assert ds.skipped.total == 0 and {r.image_id for r in ds.records} == set(names)
    # Two photos of one caption each hold 20 captions: fewer than the 25 asked for, said in a warning.
    assert all(len(r.candidates or ()) == 20 for r in ds.records)
    assert "fewer than 25 candidates" in caplog.text


def test_cli_writes_the_dataset_and_fails_in_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = _write_source(tmp_path / "src")
    assert main(["data", "voices", "--captions", str(source), "--out", str(tmp_path / "out"),
                 "--candidates", "30"]) == 0
    assert json.loads((tmp_path / "out" / "val.json").read_text())[0]["candidates"].__len__() == 30
    assert main(["data", "voices", "--captions", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x")]) == 2
    assert "dataset file not found" in caplog.text and not (tmp_path / "x").exists()


@pytest.mark.shared
def test_flickr8k_voices(tmp_path: Path) -> None:
    source = shared_path("data", "flickr8k-1k", "captions.csv")
    write_voiced_dataset(source, tmp_path / "voices")
    ds = load_dataset(tmp_path / "voices" / "captions.csv")
    plain = load_dataset(source)
    assert ds.skipped.total == 0 and len(ds) == len(plain) * len(VOICES)
    assert {r.split for r in ds.records} == {"train", "val"} and not (tmp_path / "voices" / "test.json").exists()
    val = load_dataset(tmp_path / "voices" / "val.json")
    assert len(val) == len({r.image_id for r in plain.records if r.split == "val"}) * len(VOICES)
    photo_of = {r.caption: r.image_id for r in ds.records}
    for r in val.records:
        assert r.candidates is not None and len(r.candidates) == 100 == len(set(r.candidates))
        assert sum(photo_of[c] == r.image_id for c in r.candidates) == len(VOICES)


def test_an_images_link_from_before_is_replaced_not_followed(tmp_path: Path) -> None:
    source = _write_source(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "images").symlink_to(tmp_path / "src" / "images", target_is_directory=True)
    write_voiced_dataset(source, out, num_candidates=10)
    assert not (out / "images").is_symlink() and (out / "images").is_dir()
    assert sorted(p.name for p in (tmp_path / "src" / "images").iterdir()) == sorted(CAPTIONS)  # untouched
    assert load_dataset(out / "captions.csv").skipped.total == 0
