"""Approximate indexes are tuned with the queries the service searches with: the checkpoint's held-out photos
in every personality (build, add and remove), caption vectors only where no such photo is on this machine."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from transresnet.index import faiss_index as fx
from transresnet.index.incremental import add_captions, remove_captions, stored_vectors
from transresnet.index.search import load_index

from tests.helpers import TINY_TRAITS, build_test_index, tiny_tree, write_image
from transresnet.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from transresnet.config import build_config
from transresnet.encode import encode_photo_queries
from transresnet.image_runtime import held_out_photos
from transresnet.images import ImagePreprocessor
from transresnet.model import create_model
from transresnet.traits import TraitVocab

VAL_PHOTOS = 12
SLOTS = len(TINY_TRAITS) + 1  # every trait and none


WORDS = ("dog", "cat", "red", "car", "beach", "cake", "bridge", "street", "kids", "lake", "soup", "snow", "man",
         "woman", "ball", "grass", "water", "bike", "tree", "sky", "blue", "old", "young", "runs", "jumps", "sits")


def captions(count: int, offset: int = 0) -> list[str]:
    """Distinct captions of random words (spread-out vectors, even from a random text encoder)."""
    rng = np.random.default_rng(offset)
    return [" ".join(rng.choice(WORDS, size=6)) + f" {i}" for i in range(offset, offset + count)]


def photo_checkpoint(root: Path, text_model: Path, photos: bool = True) -> Checkpoint:
    """A random tiny checkpoint trained (on paper) on a CSV of 8 train and 12 val photos; ``photos=False``
    deletes the photos again, as on a machine that has only the checkpoint."""
    data = root / "data"
    rows = [{"image": f"p{i}.jpg", "split": "val" if i < VAL_PHOTOS else "train", "caption": f"photo {i}"}
            for i in range(VAL_PHOTOS + 8)]
    for i, row in enumerate(rows):
        write_image(data / "images" / row["image"], seed=i)
    with (data / "captions.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "split", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    config = build_config(tiny_tree(text_model, data={"train": str(data / "captions.csv")}))
    torch.manual_seed(0)
    checkpoint = load_checkpoint(save_checkpoint(create_model(config.model, TraitVocab(TINY_TRAITS)), config,
                                                 root / "ckpt" / "best"))
    if not photos:
        for path in (data / "images").iterdir():
            path.unlink()
    return checkpoint


def val_photo_queries(checkpoint: Checkpoint) -> np.ndarray:
    paths = held_out_photos(checkpoint.config.data)
    assert len(paths) == VAL_PHOTOS
    preprocessor = ImagePreprocessor(checkpoint.config.model.image)
    pixels = torch.stack([preprocessor.load(path) for path in paths])
    return np.concatenate(encode_photo_queries(checkpoint.model, pixels, [list(range(SLOTS))] * len(pixels)))


@pytest.fixture(scope="module")
def checkpoint(tiny_text_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return photo_checkpoint(tmp_path_factory.mktemp("photo_ckpt"), tiny_text_model)


def test_hnsw_is_tuned_to_its_target_on_the_held_out_photos_queries(checkpoint: Checkpoint, tmp_path: Path) -> None:
    version = build_test_index(checkpoint, tmp_path, captions(600), index_type="hnsw", recall_target=0.99)
    index = load_index(version, checkpoint=checkpoint)
    tuning = index.manifest["index"]["tuning"]
    assert tuning["queries"] == f"{VAL_PHOTOS * SLOTS} queries of {VAL_PHOTOS} held-out photos x {SLOTS} personalities"
    assert tuning["n_queries"] == VAL_PHOTOS * SLOTS and tuning["reached"] is True
    # The tuned parameters hold on the photos' queries, computed here independently of the build.
    queries = val_photo_queries(checkpoint)
    vectors, _ = stored_vectors(index.faiss_index)
    _, truth = fx.exact_search(vectors, queries, 10)
    _, found = index.search_ids(queries, 10)
    assert fx.recall_at(found, truth, 10) >= 0.99


def test_tuning_queries_are_capped_and_tune_photos_zero_uses_caption_vectors(checkpoint: Checkpoint,
                                                                             tmp_path: Path) -> None:
    capped = build_test_index(checkpoint, tmp_path / "capped", captions(300), index_type="ivf", nlist=8,
                              tune_queries=20, tune_photos=3)
    tuning = load_index(capped).manifest["index"]["tuning"]
    assert tuning["queries"] == f"15 queries of 3 held-out photos x {SLOTS} personalities"  # 3 x 5 <= 20
    sampled = build_test_index(checkpoint, tmp_path / "sampled", captions(300), index_type="ivf", nlist=8,
                               tune_queries=20)
    assert load_index(sampled).manifest["index"]["tuning"]["n_queries"] == 20  # 12 photos x 5 slots, sampled
    captions_only = build_test_index(checkpoint, tmp_path / "captions", captions(300), index_type="ivf", nlist=8,
                                     tune_photos=0)
    assert load_index(captions_only).manifest["index"]["tuning"]["queries"] == "held-out caption vectors"
    flat = build_test_index(checkpoint, tmp_path / "flat", captions(300))
    assert load_index(flat).manifest["index"]["tuning"]["queries"] == "exact"  # nothing to tune, no photos read


def test_without_the_photos_on_this_machine_caption_vectors_tune(tiny_text_model: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    checkpoint = photo_checkpoint(tmp_path, tiny_text_model, photos=False)
    with caplog.at_level("INFO", logger="transresnet.index.build"):
        version = build_test_index(checkpoint, tmp_path / "index", captions(300), index_type="ivf", nlist=8)
    assert load_index(version).manifest["index"]["tuning"]["queries"] == "held-out caption vectors"
    assert "no held-out photos" in caplog.text


def test_add_and_remove_recheck_recall_on_the_photos_queries(checkpoint: Checkpoint, tmp_path: Path) -> None:
    build_test_index(checkpoint, tmp_path, captions(300), index_type="hnsw", recall_target=0.99)
    new = tmp_path / "new.txt"
    new.write_text("\n".join(captions(300, offset=300)) + "\n")
    added = add_captions(tmp_path, new, checkpoint, progress=False)
    assert "held-out photos" in added.published.manifest["index"]["tuning"]["queries"]
    for name, first, given, expected in (("ids1.txt", 0, checkpoint, "held-out photos"),
                                         ("ids2.txt", 50, None, "held-out caption vectors")):  # no checkpoint
        ids = tmp_path / name
        ids.write_text("\n".join(str(i) for i in range(first, first + 50)) + "\n")
        removed = remove_captions(tmp_path, ids, checkpoint=given)
        assert removed.published is not None
        assert expected in removed.published.manifest["index"]["tuning"]["queries"]
