"""Dataset readers: CSV, Personality-Captions JSON and Karpathy JSON, on small files written here."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from tests.helpers import shared_path, write_image
from transresnet.data import EMPTY_CAPTION, MALFORMED_RECORD, MISSING_IMAGE, SkipReport, load_dataset


def _image(path: Path) -> None:
    write_image(path, size=(8, 8))


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def csv_dataset(tmp_path: Path) -> Path:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _image(tmp_path / "images" / name)
    return _write_csv(tmp_path / "captions.csv", ["image", "split", "caption", "personality"], [
        ["a.jpg", "train", "  A red thing. ", "Sweet"],
        ["a.jpg", "train", "A red thing, again.", ""],
        ["b.jpg", "val", "A blue thing.", "Angry"],
        ["c.jpg", "train", "   ", "Sweet"],  # empty caption
        ["missing.jpg", "train", "No photo here.", "Sweet"],  # missing image
        ["c.jpg", "test", "A green thing.", "Cheerful"],
    ])


# -------------------------------------------------------------------------------------------- CSV


def test_csv_reads_records_and_skips_bad_ones(csv_dataset: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="transresnet.data"):
        ds = load_dataset(csv_dataset)
    assert [r.caption for r in ds.records] == ["A red thing.", "A red thing, again.", "A blue thing.", "A green thing."]
    first = ds.records[0]
    assert first.image_id == "a.jpg"
    assert first.image_path == (csv_dataset.parent / "images" / "a.jpg").resolve()
    assert first.image_path.is_absolute()
    assert first.personality == "Sweet" and first.split == "train" and first.candidates is None
    assert ds.records[1].personality is None  # empty cell = no personality
    assert ds.skipped.counts == {EMPTY_CAPTION: 1, MISSING_IMAGE: 1}
    assert ds.skipped.total == 2
    assert any("missing.jpg" in e for e in ds.skipped.examples[MISSING_IMAGE])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 record" in warnings[0].getMessage()
    assert ds.source == csv_dataset.resolve()
    assert ds.image_ids() == ["a.jpg", "b.jpg", "c.jpg"]
    assert ds.personalities() == ["Sweet", "Angry", "Cheerful"]


def test_csv_split_filter(csv_dataset: Path) -> None:
    val = load_dataset(csv_dataset, split="val")
    assert [(r.image_id, r.split) for r in val.records] == [("b.jpg", "val")]
    train = load_dataset(csv_dataset, split="train")
    assert {r.split for r in train.records} == {"train"}
    assert len(train) == 2
    assert train.skipped.total == 2  # the bad rows are train rows
    assert load_dataset(csv_dataset, split="test").skipped.total == 0  # bad rows of other splits not checked


def test_csv_unknown_split_names_the_splits_present(csv_dataset: Path) -> None:
    with pytest.raises(ValueError, match=r"no record of split 'dev'.*test, train, val"):
        load_dataset(csv_dataset, split="dev")


def test_csv_image_dir_and_no_personality_column(tmp_path: Path) -> None:
    _image(tmp_path / "photos" / "x.jpg")
    path = _write_csv(tmp_path / "caps.csv", ["image", "split", "caption"], [["x.jpg", "train", "An x."]])
    assert load_dataset(path).records == []  # default images/ folder is absent: skipped, not a crash
    ds = load_dataset(path, image_dir=tmp_path / "photos")
    assert len(ds) == 1 and ds.records[0].personality is None
    assert ds.records[0].image_path == (tmp_path / "photos" / "x.jpg").resolve()


def test_csv_without_images_when_not_required(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "pool.csv", ["image", "caption"], [["gone.jpg", "A caption."], ["gone.jpg", ""]])
    ds = load_dataset(path, require_images=False)
    assert [r.caption for r in ds.records] == ["A caption."]
    assert ds.skipped.counts == {EMPTY_CAPTION: 1}


def test_csv_missing_columns_raises_helpful_error(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "bad.csv", ["file", "text"], [["a.jpg", "x"]])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) image, caption.*image,split,caption"):
        load_dataset(path)


def test_csv_row_with_extra_cells_is_skipped(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "a.jpg")
    path = tmp_path / "c.csv"
    path.write_text("image,split,caption\na.jpg,train,ok\na.jpg,train,too,many,cells\n", encoding="utf-8")
    ds = load_dataset(path)
    assert len(ds) == 1 and ds.skipped.counts == {MALFORMED_RECORD: 1}


# ------------------------------------------------------------------------ Personality-Captions JSON


def _pc_record(image_hash: str, comment: str, personality: str = "Sweet", **extra: object) -> dict:
    return {"image_hash": image_hash, "personality": personality, "comment": comment, **extra}


def test_personality_captions_reader(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for h in ("h1", "h2"):
        _image(tmp_path / "images" / f"{h}.jpg")
    candidates = [f"cand {i}" for i in range(99)] + ["Gold one."]
    data = [
        _pc_record("h1", " Gold one. ", candidates=candidates, additional_comments=["Other gold.", " "],
                   **{"500_candidates": ["Gold one.", "x"]}),
        _pc_record("h2", "Plain.", personality=""),
        _pc_record("h3", "No image."),
        _pc_record("h2", ""),
        {"comment": "no hash"},
        "not an object",
    ]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="transresnet.data"):
        ds = load_dataset(path)
    assert [r.caption for r in ds.records] == ["Gold one.", "Plain."]
    first = ds.records[0]
    assert first.image_id == "h1.jpg" and first.image_path == (tmp_path / "images" / "h1.jpg").resolve()
    assert first.split == "test"  # from the file name
    assert first.candidates is not None and len(first.candidates) == 100 and "Gold one." in first.candidates
    assert first.candidates_500 == ("Gold one.", "x")
    assert first.additional_captions == ("Other gold.",)
    assert ds.records[1].personality is None and ds.records[1].candidates is None
    assert ds.skipped.counts == {MISSING_IMAGE: 1, EMPTY_CAPTION: 1, MALFORMED_RECORD: 2}
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


def test_personality_captions_split_from_argument_or_default(tmp_path: Path) -> None:
    _image(tmp_path / "imgs" / "h1.jpg")
    path = tmp_path / "personality_captions_sample.json"
    path.write_text(json.dumps([_pc_record("h1", "Hi.")]), encoding="utf-8")
    assert load_dataset(path, image_dir=tmp_path / "imgs").records[0].split == "test"
    assert load_dataset(path, image_dir=tmp_path / "imgs", split="val").records[0].split == "val"
    train = tmp_path / "train.json"
    train.write_text(path.read_text(), encoding="utf-8")
    assert load_dataset(train, image_dir=tmp_path / "imgs").records[0].split == "train"


def test_personality_captions_bad_candidates_are_skipped(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "h1.jpg")
    path = tmp_path / "val.json"
    path.write_text(json.dumps([_pc_record("h1", "x", candidates="not a list"), _pc_record("h1", "y")]))
    ds = load_dataset(path)
    assert [r.caption for r in ds.records] == ["y"] and ds.skipped.counts == {MALFORMED_RECORD: 1}


# ---------------------------------------------------------------------------------- Karpathy JSON


def test_karpathy_reader(tmp_path: Path) -> None:
    _image(tmp_path / "train2014" / "a.jpg")
    _image(tmp_path / "val2014" / "b.jpg")
    _image(tmp_path / "c.jpg")
    data = {"images": [
        {"filename": "a.jpg", "filepath": "train2014", "split": "restval",
         "sentences": [{"raw": "A one."}, {"raw": "A two."}, {"raw": "  "}]},
        {"filename": "b.jpg", "filepath": "val2014", "split": "test", "sentences": [{"raw": "B one."}]},
        {"filename": "c.jpg", "split": "val", "sentences": [{"raw": "C one."}]},
        {"filename": "gone.jpg", "split": "train", "sentences": [{"raw": "Gone."}]},
        {"split": "train"},
    ]}
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    ds = load_dataset(path)
    assert [(r.image_id, r.caption, r.split) for r in ds.records] == [
        ("train2014/a.jpg", "A one.", "train"),  # restval counts as train
        ("train2014/a.jpg", "A two.", "train"),
        ("val2014/b.jpg", "B one.", "test"),
        ("c.jpg", "C one.", "val"),
    ]
    assert all(r.personality is None for r in ds.records)
    assert ds.records[2].image_path == (tmp_path / "val2014" / "b.jpg").resolve()
    assert ds.skipped.counts == {EMPTY_CAPTION: 1, MISSING_IMAGE: 1, MALFORMED_RECORD: 1}
    train = load_dataset(path, split="train", fmt="karpathy")
    assert {r.image_id for r in train.records} == {"train2014/a.jpg"}


# ------------------------------------------------------------------------------ malformed files


def test_not_json_raises_helpful_error(tmp_path: Path) -> None:
    path = tmp_path / "test.json"
    path.write_text("{ this is not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"not valid JSON.*image_hash"):
        load_dataset(path)


def test_json_of_unknown_shape_raises(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"annotations": []}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"cannot tell the format.*images"):
        load_dataset(path)
    with pytest.raises(ValueError, match=r"must be a list of records"):
        load_dataset(path, fmt="personality_captions")
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no 'images' list.*filename"):
        load_dataset(path, fmt="karpathy")


def test_json_forced_as_csv_raises(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps([_pc_record("h", "c")]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"lacks the column"):
        load_dataset(path, fmt="csv")


def test_unknown_format_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset format 'tsv'.*karpathy"):
        load_dataset(tmp_path / "a.csv", fmt="tsv")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="is a folder"):
        load_dataset(tmp_path)


def test_skip_report_keeps_first_examples_only() -> None:
    report = SkipReport(max_examples=2)
    assert not report and report.total == 0
    for i in range(5):
        report.add(MISSING_IMAGE, f"img{i}")
    assert report.counts == {MISSING_IMAGE: 5} and report.examples[MISSING_IMAGE] == ["img0", "img1"]
    assert "5 x missing image (e.g. img0; img1)" in report.summary()


# ------------------------------------------------------------------------------------ real data


@pytest.mark.shared
def test_real_flickr8k_1k_csv() -> None:
    path = shared_path("data", "flickr8k-1k", "captions.csv")
    ds = load_dataset(path)
    assert len(ds) == 4000 and ds.skipped.total == 0
    assert len(ds.image_ids()) == 800
    assert len({r.image_id for r in ds.records if r.split == "train"}) == 700
    assert len({r.image_id for r in ds.records if r.split == "val"}) == 100
    assert all(r.personality is None for r in ds.records)
    assert len(load_dataset(path, split="val")) == 500
