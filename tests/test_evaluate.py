"""`transresnet eval`: both protocols against plain references, the CLI, and exact vs index agreement."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transresnet.index.evaluate import run_eval

from tests.helpers import write_image
from transresnet import cli
from transresnet.checkpoint import Checkpoint
from transresnet.evaluate import (
    CURVE_K,
    EvalOptions,
    format_text_table,
    ranks_from_search,
    summarize,
    trait_slots,
    transpose_gold,
)
from transresnet.images import ImagePreprocessor
from transresnet.metrics import gold_ranks


def reference_rank(scores: list[float], gold: list[bool]) -> int:
    """Sort by score, wrong answers first among equals; 1-based position of the first gold."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], gold[i]))
    return next(pos for pos, i in enumerate(order, start=1) if gold[i])


def reference_recall(ranks: list[int], k: int) -> float:
    return 100.0 * sum(1 for r in ranks if r <= k) / len(ranks)


def reference_median(values: list[int]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# ----------------------------------------------------------------------------------- ranks from a search


def _search(scores: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Top-k like a search engine: descending score, ties in arbitrary (random) order."""
    jitter = rng.random(scores.shape)
    order = np.lexsort((jitter, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("seed", range(4))
def test_ranks_from_a_full_search_match_the_reference_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=(30, 25)).astype(np.float32)  # many ties
    gold = rng.random((30, 25)) < 0.15
    gold[np.arange(30), rng.integers(0, 25, 30)] = True
    top_scores, ids = _search(scores, 25, rng)
    ranks = ranks_from_search(top_scores, ids, [np.flatnonzero(g) for g in gold])
    expected = [reference_rank(list(s), list(g)) for s, g in zip(scores, gold, strict=True)]
    assert ranks.tolist() == expected
    assert ranks.tolist() == gold_ranks(scores, gold).tolist()
    metrics, curve = summarize(ranks)
    assert len(curve) == CURVE_K
    for k in (1, 5, 10):
        assert metrics[f"R@{k}"] == pytest.approx(reference_recall(expected, k))
        assert curve[k - 1] == pytest.approx(reference_recall(expected, k))
    assert metrics["median_rank"] == reference_median(expected)


def test_a_truncated_search_censors_ranks_beyond_k() -> None:
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(40, 60)).astype(np.float32)  # no ties
    gold = np.zeros((40, 60), bool)
    gold[np.arange(40), rng.integers(0, 60, 40)] = True
    full = gold_ranks(scores, gold)
    top_scores, ids = _search(scores, 10, rng)
    ids[0, -3:] = -1  # an approximate index may return fewer than k results
    top_scores[0, -3:] = -np.inf
    ranks = ranks_from_search(top_scores, ids, [np.flatnonzero(g) for g in gold])
    expected = np.minimum(full, 11)
    expected[0] = full[0] if full[0] <= 7 else 11
    assert ranks.tolist() == expected.tolist()
    metrics, _ = summarize(ranks, searched_k=10)
    assert metrics.get("median_rank_censored", False) == (metrics["median_rank"] > 10)


def test_transposed_gold_lists_the_queries_of_each_caption() -> None:
    gold = [np.array([0, 2]), np.array([1]), np.array([2, 3])]
    assert [g.tolist() for g in transpose_gold(gold, 4)] == [[0], [1], [0, 2], [2]]


# ------------------------------------------------------------------------------------------ fixtures


def _write_images(folder: Path, names: list[str], seed: int = 0) -> None:
    for i, name in enumerate(names):
        write_image(folder / name, seed=seed * 1000 + i)


CAPTION_WORDS = ["a dog runs", "two cats sleep", "the red car", "children play", "a man surfs", "birds fly",
                 "an old house", "green fields", "a busy street", "snow on hills", "a boat sails", "kids laugh"]


@pytest.fixture(scope="module")
def pc_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Personality-Captions test file: 100-style (10) and 500-style (20, 5 golds) candidate lists."""
    root = tmp_path_factory.mktemp("pc")
    rng = np.random.default_rng(3)
    traits = ["Sarcastic", "Sweet", "Angry", "Cheerful"]
    entries = []
    for i in range(12):
        comment = f"{CAPTION_WORDS[i]} number {i}"
        extra = [f"{CAPTION_WORDS[(i + j) % 12]} also {i}-{j}" for j in range(1, 5)]
        distractors = [f"distractor {i} {j} {CAPTION_WORDS[j % 12]}" for j in range(30)]
        cands = [comment, *distractors[:9]]
        rng.shuffle(cands)
        cands500 = [comment, *extra, *distractors[9:24]]
        rng.shuffle(cands500)
        entries.append({"image_hash": f"img{i:02d}", "personality": traits[i % 4], "comment": comment,
                        "additional_comments": extra, "candidates": cands, "500_candidates": cands500})
    _write_images(root / "images", [f"img{i:02d}.jpg" for i in range(12)])
    path = root / "test.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture(scope="module")
def pool_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 images with 2 captions each (split val) plus a train image that must be ignored."""
    root = tmp_path_factory.mktemp("pool")
    names = [f"p{i}.jpg" for i in range(9)]
    _write_images(root / "images", names, seed=1)
    traits = ["Sarcastic", "Sweet", "Angry", "Cheerful"]
    with open(root / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "split", "caption", "personality"])
        for i in range(8):
            for j in range(2):
                writer.writerow([names[i], "val", f"{CAPTION_WORDS[(i + 3 * j) % 12]} {i}.{j}", traits[i % 4]])
        writer.writerow([names[8], "train", "a train caption", "Sweet"])
    return root / "captions.csv"


def _model_vectors(checkpoint: Checkpoint, image_paths: list[Path], traits: list[str], texts: list[str]):
    """Plain reference vectors straight from the model (no cache, no index package)."""
    model = checkpoint.model
    pre = ImagePreprocessor(checkpoint.config.model.image)
    with torch.inference_mode():
        pixels = torch.stack([pre.load(p) for p in image_paths])
        queries = model.encode_query(images=pixels, trait_ids=torch.tensor(model.traits.lookup_many(traits)))
        captions = model.encode_text(texts)
    return queries.numpy(), captions.numpy()


# --------------------------------------------------------------------------------------- candidates


@pytest.mark.parametrize("protocol", ["candidates", "candidates500"])
def test_candidates_protocol_matches_a_plain_reference(protocol: str, pc_file: Path, tiny_checkpoint: Checkpoint,
                                                       tmp_path: Path) -> None:
    options = EvalOptions(checkpoint=tiny_checkpoint.path, data=pc_file, protocol=protocol, out=tmp_path / "out",
                          feature_cache=str(tmp_path / "features"), device="cpu")
    report = run_eval(options)
    entries = json.loads(pc_file.read_text())
    key = "500_candidates" if protocol == "candidates500" else "candidates"
    expected = []
    for entry in entries:
        cands = entry[key]
        golds = {entry["comment"], *entry["additional_comments"]}
        q, c = _model_vectors(tiny_checkpoint, [pc_file.parent / "images" / f"{entry['image_hash']}.jpg"],
                              [entry["personality"]], cands)
        expected.append(reference_rank(list(c @ q[0]), [x in golds for x in cands]))
    (row,) = report["results"]
    assert row["metrics"]["queries"] == 12
    for k in (1, 5, 10):
        assert row["metrics"][f"R@{k}"] == pytest.approx(reference_recall(expected, k))
    assert row["metrics"]["median_rank"] == reference_median(expected)
    assert row["curve"][len(entries[0][key]) - 1] == 100.0  # every gold is somewhere in its own list
    assert report["protocol"] == protocol and report["checkpoint"]["fingerprint"] == tiny_checkpoint.fingerprint
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"eval.json", "eval.md", "recall_at_k.png"}


def test_candidates_protocol_without_candidate_lists_is_a_clear_error(pool_csv: Path, tiny_checkpoint: Checkpoint,
                                                                      tmp_path: Path) -> None:
    options = EvalOptions(checkpoint=tiny_checkpoint.path, data=pool_csv, protocol="candidates", split="val",
                          feature_cache=str(tmp_path / "features"), device="cpu")
    with pytest.raises(ValueError, match="--protocol pool"):
        run_eval(options)


def test_trait_modes(tiny_checkpoint: Checkpoint) -> None:
    traits = ["Sarcastic", "Sweet", "Angry", "Cheerful", "Sweet"]
    given = trait_slots(tiny_checkpoint, traits, "given", 0)
    assert given == tiny_checkpoint.traits.lookup_many(traits)
    assert sorted(trait_slots(tiny_checkpoint, traits, "shuffled", 0)) == sorted(given)
    assert trait_slots(tiny_checkpoint, traits, "none", 0) == [0] * 5
    with pytest.raises(ValueError, match="unknown personality"):
        trait_slots(tiny_checkpoint, ["Sarcastc"], "given", 0)


# --------------------------------------------------------------------------------------------- pool


def _pool_reference(checkpoint: Checkpoint, csv_path: Path) -> tuple[list[int], list[int]]:
    """Image->caption and caption->image ranks computed by brute force from the model's own vectors."""
    with open(csv_path) as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "val"]
    images = list(dict.fromkeys(r["image"] for r in rows))
    traits = [next(r["personality"] for r in rows if r["image"] == im) for im in images]
    texts = [r["caption"] for r in rows]
    q, c = _model_vectors(checkpoint, [csv_path.parent / "images" / im for im in images], traits, texts)
    scores = q @ c.T
    gold = np.array([[r["image"] == im for r in rows] for im in images])
    i2c = [reference_rank(list(s), list(g)) for s, g in zip(scores, gold, strict=True)]
    c2i = [reference_rank(list(s), list(g)) for s, g in zip(scores.T, gold.T, strict=True)]
    return i2c, c2i


def _rows(report: dict) -> dict[tuple[str, bool], dict]:
    return {(r["direction"], r["search"] == "exact"): r for r in report["results"]}


def test_pool_protocol_through_the_cli(pool_csv: Path, tiny_checkpoint: Checkpoint, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = cli.main(["eval", "--checkpoint", str(tiny_checkpoint.path), "--data", str(pool_csv), "--split", "val",
                   "--protocol", "pool", "--index-type", "flat", "--out", str(out),
                   "--feature-cache", str(tmp_path / "features"), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "image->caption" in printed and "caption->image" in printed and "R@10" in printed
    report = json.loads((out / "eval.json").read_text())
    assert (out / "recall_at_k.png").stat().st_size > 1000
    assert "| image->caption | exact |" in (out / "eval.md").read_text()
    assert report["checkpoint"]["fingerprint"] == tiny_checkpoint.fingerprint
    assert report["data"]["path"] == str(pool_csv.resolve()) and report["data"]["split"] == "val"
    assert report["protocol"] == "pool" and report["date"].endswith("Z")
    assert report["data"]["queries"] == 8 and report["data"]["captions"] == 16  # the train row is not in the pool

    i2c, c2i = _pool_reference(tiny_checkpoint, pool_csv)
    rows = _rows(report)
    for direction, expected in (("image->caption", i2c), ("caption->image", c2i)):
        exact = rows[(direction, True)]["metrics"]
        assert exact["queries"] == len(expected)
        for k in (1, 5, 10):
            assert exact[f"R@{k}"] == pytest.approx(reference_recall(expected, k))
        assert exact["median_rank"] == reference_median(expected)
        assert exact["mean_rank"] == pytest.approx(np.mean(expected))
    mean = rows[("mean", True)]["metrics"]
    assert mean["R@1"] == pytest.approx((rows[("image->caption", True)]["metrics"]["R@1"]
                                         + rows[("caption->image", True)]["metrics"]["R@1"]) / 2)


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_exact_and_index_rows_agree_where_the_index_is_exact(index_type: str, pool_csv: Path,
                                                              tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    options = EvalOptions(checkpoint=tiny_checkpoint.path, data=pool_csv, split="val", index_type=index_type,
                          out=tmp_path / "out", feature_cache=str(tmp_path / "features"), device="cpu")
    report = run_eval(options)
    rows = _rows(report)
    assert set(report["recall_lost"]) == {"image->caption", "caption->image", "mean"}
    assert report["search"]["caption_index"]["type"] == index_type
    if index_type == "flat":
        # An exact index over 16 captions (all returned): the same ranks as exact search, row for row.
        for direction in ("image->caption", "caption->image", "mean"):
            assert rows[(direction, False)]["metrics"] == pytest.approx(rows[(direction, True)]["metrics"])
            assert rows[(direction, False)]["curve"] == pytest.approx(rows[(direction, True)]["curve"])
            assert all(v == 0 for v in report["recall_lost"][direction].values())
    for direction in ("image->caption", "caption->image"):
        # An approximate index can only lose recall, never gain it.
        assert all(v >= -1e-9 for v in report["recall_lost"][direction].values())
    assert "recall the index loses" in format_text_table(report)


def test_pool_protocol_with_a_prebuilt_index(pool_csv: Path, tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    from transresnet.index.build import BuildOptions, build_index

    root = tmp_path / "index"
    build_index(tiny_checkpoint, pool_csv, root, BuildOptions(index_type="flat", precision="float32"))
    report = run_eval(EvalOptions(checkpoint=tiny_checkpoint.path, data=pool_csv, split="val", index=root,
                                  feature_cache=str(tmp_path / "features"), device="cpu"))
    rows = _rows(report)
    # The index also holds the train caption: one distractor more than the split, the same for both rows.
    assert report["search"]["caption_index"]["count"] == 17
    assert rows[("image->caption", False)]["search"].startswith("flat")
    assert rows[("image->caption", False)]["metrics"] == pytest.approx(rows[("image->caption", True)]["metrics"])


def test_an_index_missing_split_captions_is_refused(pool_csv: Path, tiny_checkpoint: Checkpoint,
                                                    tmp_path: Path) -> None:
    from transresnet.index.build import BuildOptions, build_index

    few = tmp_path / "few.txt"
    few.write_text("a dog runs 0.0\nsomething else\n")
    build_index(tiny_checkpoint, few, tmp_path / "index", BuildOptions(index_type="flat"))
    with pytest.raises(ValueError, match="lacks 15 of the split's 16 captions"):
        run_eval(EvalOptions(checkpoint=tiny_checkpoint.path, data=pool_csv, split="val", index=tmp_path / "index",
                             feature_cache=str(tmp_path / "features"), device="cpu"))


# ------------------------------------------------------- hard negatives (train.hard_negatives, used by the table)


def test_hard_negatives_are_the_top_scoring_non_gold_pool_captions(tiny_checkpoint: Checkpoint) -> None:
    from transresnet.train import Example, TextInputs, _CaptionPool

    examples = [Example(image_row=i // 2, trait=0, caption=f"{CAPTION_WORDS[i]} {i}", query_key=i // 2)
                for i in range(12)]
    pool = _CaptionPool(examples)
    model = tiny_checkpoint.model
    texts = TextInputs(model)
    texts.precompute(pool.texts)
    batch = examples[:4]  # queries 0 and 1: their four captions are golds, never negatives
    queries = torch.randn(4, model.embed_dim, generator=torch.Generator().manual_seed(0))
    hard = pool.hardest(model, texts, queries, batch, 5)
    with torch.inference_mode():
        scores = (queries @ model.encode_text(pool.texts).T).max(dim=0).values.clone()
        scores[:4] = float("-inf")
    assert set(hard) == {pool.texts[i] for i in scores.topk(5).indices.tolist()}
    assert len(pool.hardest(model, texts, queries, batch, 50)) == 8  # all non-gold captions, no more


def test_training_with_hard_negatives(pool_csv: Path, tiny_text_model: Path, tmp_path: Path) -> None:
    from tests.helpers import tiny_tree
    from transresnet.config import build_config
    from transresnet.train import train

    tree = tiny_tree(tiny_text_model, data={"train": str(pool_csv), "train_split": "val", "val_split": "val",
                                            "feature_cache": str(tmp_path / "features")},
                     train={"epochs": 2, "batch_size": 4, "hard_negatives": 3})
    result = train(build_config(tree), tmp_path / "run")
    assert result.metrics["val"]["queries"] == 8
