"""`transresnet index build | info | query` end to end on the tiny checkpoint."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from tests.helpers import write_image
from transresnet.checkpoint import Checkpoint
from transresnet.cli import main

SUBJECTS = ["a dog", "two cats", "a red car", "the beach", "a cake", "an old bridge", "a street", "three kids"]
VOICES = {"Sweet": "Aww, look at {}!", "Angry": "I hate {}.", "Sarcastic": "Oh great, {} again."}


@pytest.fixture
def caption_csv(tmp_path: Path) -> Path:
    path = tmp_path / "captions.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "caption", "personality", "image"])
        for trait, template in VOICES.items():
            for i, subject in enumerate(SUBJECTS):
                writer.writerow([f"{trait[:2]}{i}", template.format(subject), trait, f"{i}.jpg"])
        writer.writerow(["dup", "I hate a dog.", "Angry", "x.jpg"])
        writer.writerow(["empty", "  ", "Sweet", "y.jpg"])
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return write_image(tmp_path / "photo.png", size=(40, 30))


def test_build_info_query(tiny_checkpoint: Checkpoint, caption_csv: Path, image: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "index"
    with caplog.at_level(logging.WARNING):
        assert main(["index", "build", "--checkpoint", str(tiny_checkpoint.path), "--captions", str(caption_csv),
                     "--out", str(root), "--batch-size", "5"]) == 0
    assert "dropped 1 empty and 1 duplicate captions of 26 rows; 24 kept" in caplog.text
    assert "published" in capsys.readouterr().out

    assert main(["index", "info", str(root)]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["count"] == 24 and manifest["dim"] == 16 and manifest["has_personality"]
    assert manifest["checkpoint"]["fingerprint"] == tiny_checkpoint.fingerprint
    assert manifest["source"]["dropped_duplicate"] == 1 and manifest["encoding"]["batch_size"] == 5

    assert main(["index", "query", "--checkpoint", str(tiny_checkpoint.path), "--index", str(root),
                 "--image", str(image), "--personality", "sweet", "-k", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "as Sweet" in lines[0] and lines[1].split() == ["rank", "score", "caption", "personality", "id"]
    assert [line.split()[0] for line in lines[3:]] == ["1", "2", "3", "4"]

    assert main(["index", "query", "--checkpoint", str(tiny_checkpoint.path), "--index", str(root),
                 "--image", str(image), "--personality", "Angry", "-k", "3", "--filter", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and {h["metadata"]["personality"] for h in hits} == {"Angry"}
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_cli_errors_are_clean(tiny_checkpoint: Checkpoint, caption_csv: Path, image: Path, tmp_path: Path,
                              caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("image,text\na.jpg,hello\n")
    with caplog.at_level(logging.ERROR):
        assert main(["index", "build", "--checkpoint", str(tiny_checkpoint.path), "--captions", str(bad),
                     "--out", str(tmp_path / "x")]) == 2
        assert "no 'caption' column" in caplog.text
        assert main(["index", "info", str(tmp_path / "nothing")]) == 2
        assert "no caption index at" in caplog.text
        root = tmp_path / "index"
        assert main(["index", "build", "--checkpoint", str(tiny_checkpoint.path), "--captions", str(caption_csv),
                     "--out", str(root), "--type", "hnsw"]) == 0
        assert main(["index", "query", "--checkpoint", str(tiny_checkpoint.path), "--index", str(root),
                     "--image", str(image), "--personality", "Grumpy"]) == 2
        assert "unknown personality 'Grumpy'" in caplog.text
        assert main(["index", "query", "--checkpoint", str(tiny_checkpoint.path), "--index", str(root),
                     "--image", str(image), "--personality", "Sweet", "-k", "99"]) == 2
        assert "k=99 exceeds the 24 captions" in caplog.text


def test_verify_and_rollback(tiny_checkpoint: Checkpoint, caption_csv: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "index"
    versions = []
    for _ in range(3):
        assert main(["index", "build", "--checkpoint", str(tiny_checkpoint.path), "--captions", str(caption_csv),
                     "--out", str(root), "--keep", "5"]) == 0
        versions.append((root / "CURRENT").read_text().strip())
    capsys.readouterr()
    assert main(["index", "verify", str(root)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split() == ["version", "current", "status", "captions", "type", "created", "fingerprint",
                                "problem"]
    assert lines[3].split()[:4] == [versions[2], "*", "ok", "24"] and "current version ok" in out

    newest = root / "versions" / versions[2] / "index.faiss"
    data = newest.read_bytes()
    newest.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    (root / "versions" / versions[1] / "manifest.json").unlink()
    assert main(["index", "verify", str(root)]) == 1
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[3:] if line.startswith("2")}
    assert "FAILED" in rows[versions[2]] and "index.faiss checksum mismatch" in rows[versions[2]]
    assert "manifest.json is missing" in rows[versions[1]] and " ok " in rows[versions[0]]
    assert f"CURRENT is bad: current version '{versions[2]}' fails verification" in out

    with caplog.at_level(logging.ERROR):
        assert main(["index", "rollback", str(root), versions[1]]) == 2
    assert f"refusing to point {root}/CURRENT at version '{versions[1]}'" in caplog.text
    assert main(["index", "rollback", str(root)]) == 0  # the newest verified older version: skips versions[1]
    assert f"CURRENT '{versions[2]}' -> '{versions[0]}'" in capsys.readouterr().out
    assert (root / "CURRENT").read_text().strip() == versions[0]
    assert main(["index", "verify", str(root)]) == 0


def test_info_refuses_a_pointer_outside_versions(tiny_checkpoint: Checkpoint, caption_csv: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "index"
    assert main(["index", "build", "--checkpoint", str(tiny_checkpoint.path), "--captions", str(caption_csv),
                 "--out", str(root)]) == 0
    (root / "CURRENT").write_text(str(tmp_path) + "\n")
    with caplog.at_level(logging.ERROR):
        assert main(["index", "info", str(root)]) == 2
    assert "which is a path, not a version name" in caplog.text and "transresnet index rollback" in caplog.text
    capsys.readouterr()
    assert main(["index", "verify", str(root)]) == 1
    assert "CURRENT is bad: CURRENT holds" in capsys.readouterr().out
    assert main(["index", "rollback", str(root)]) == 0
    assert main(["index", "info", str(root)]) == 0
