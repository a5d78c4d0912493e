"""Consensus re-ranking: agreement with the neighbour captions picks the caption, a neighbour is never its own
witness, the pool leaves the evaluated photos out, and `eval --consensus` runs it end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_generation_ensemble import _train
from tests.test_generation_train import generator_tree
from transresnet.data import load_dataset
from transresnet.generation.consensus import ConsensusRanker, load_consensus_pool, nearest_captions
from transresnet.generation.metrics import CiderD

NEIGHBOURS = ["a brown dog runs on the grass", "the brown dog is running across the grass",
              "a dog runs through green grass", "a brown dog plays on a lawn"]
POOL = [*NEIGHBOURS, "a man rides a bike down the street", "two children play in the sand",
        "a woman in a red coat walks in the snow", "a black dog swims in the lake"]


def test_scores_against_given_references_equal_the_corpus_scores() -> None:
    corpus = [[c] for c in POOL]
    with_refs = CiderD(corpus)
    df_only = CiderD(corpus, keep_references=False)
    for item, caption in enumerate(["a brown dog runs", "a man on a bike", "a dog in the lake"]):
        assert df_only.score_against(caption, corpus[item]) == pytest.approx(with_refs.score(caption, item), abs=1e-12)
    assert df_only.score_against("a dog", []) == 0.0


def test_the_caption_that_agrees_with_the_neighbours_wins_and_ties_keep_beam_order() -> None:
    ranker = ConsensusRanker(POOL)
    choices = ranker.rank(["a dog", "a brown dog runs on grass", "a man rides a bike"], NEIGHBOURS)
    assert [c.caption for c in choices] == ["a brown dog runs on grass", "a dog", "a man rides a bike"]
    assert all(c.source == "generated" for c in choices) and choices[0].consensus > choices[1].consensus > 0
    same = ranker.rank(["cats sleeping", "birds singing"], NEIGHBOURS)  # no word in common with the neighbours
    assert [c.caption for c in same] == ["cats sleeping", "birds singing"] and same[0].consensus == 0.0


def test_hybrid_ranks_the_neighbours_too_each_without_itself() -> None:
    ranker = ConsensusRanker(POOL)
    choices = ranker.rank(["a man rides a bike"], NEIGHBOURS, hybrid=True)
    assert choices[0].source == "retrieved" and choices[0].caption in NEIGHBOURS
    by_caption = {c.caption: c for c in choices}
    others = [n for n in NEIGHBOURS if n != NEIGHBOURS[0]]
    assert by_caption[NEIGHBOURS[0]].consensus == pytest.approx(100 * ranker.cider.score_against(NEIGHBOURS[0],
                                                                                                  others))
    # A generated caption equal to a neighbour is one candidate, scored without that neighbour.
    twice = ranker.rank([NEIGHBOURS[1]], NEIGHBOURS, hybrid=True)
    assert len(twice) == len(NEIGHBOURS) and [c.caption for c in twice].count(NEIGHBOURS[1]) == 1


def test_nearest_captions_are_the_top_scores_in_order() -> None:
    rng = np.random.default_rng(0)
    queries, vectors = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(len(POOL), 8)).astype(np.float32)
    found = nearest_captions(queries, vectors, POOL, 3)
    for row, captions in zip(queries @ vectors.T, found, strict=True):
        assert captions == [POOL[j] for j in np.argsort(-row)[:3]]
    assert len(nearest_captions(queries, vectors, POOL, 100)[0]) == len(POOL)


def test_the_pool_leaves_out_the_evaluated_photos(synthetic_dataset: Path, tmp_path: Path) -> None:
    val = load_dataset(synthetic_dataset, split="val").records
    pool = load_consensus_pool(synthetic_dataset, val)
    everything = load_dataset(synthetic_dataset, require_images=False).records
    assert pool.excluded == sum(r.image_id in {v.image_id for v in val} for r in everything) > 0
    assert set(pool.captions) == {r.caption for r in everything if r.split != "val"}
    only_val = tmp_path / "only_val.csv"
    with only_val.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows([(r.image_path.name, r.caption) for r in val])
    with pytest.raises(ValueError, match="no captions left"):
        load_consensus_pool(only_val, val)


@pytest.mark.slow
def test_eval_reranks_beams_by_consensus_with_a_retrieval_checkpoint(synthetic_dataset: Path, plain_checkpoint,
                                                                     tmp_path: Path) -> None:
    from transresnet.cli import main

    tree = generator_tree(synthetic_dataset, tmp_path / "cache")
    tree["train"].update(epochs=1, max_steps_per_epoch=8)
    generator = _train(tree, tmp_path / "gen")
    base = ["eval", "--checkpoint", str(generator), "--data", str(synthetic_dataset), "--split", "val",
            "--protocol", "generate", "--beam-size", "4", "--traits", "none", "--consensus", str(plain_checkpoint.path),
            "--consensus-pool", str(synthetic_dataset), "--consensus-k", "5"]

    def evaluate(name: str, *flags: str) -> dict:
        assert main([*base, *flags, "--out", str(tmp_path / name)]) == 0
        return json.loads((tmp_path / name / "eval.json").read_text())

    generated, hybrid = evaluate("generated"), evaluate("hybrid", "--consensus-candidates", "hybrid")
    val_rows = len(load_dataset(synthetic_dataset, split="val").records)
    for report in (generated, hybrid):
        info = report["consensus"]
        assert info["excluded"] == val_rows and info["k"] == 5 and report["decoding"]["beam_size"] == 4
    assert generated["consensus"]["retrieved_pct"] == 0.0
    train_captions = {r.caption for r in load_dataset(synthetic_dataset, split="train").records}
    retrieved = [e["caption"] for e in hybrid["examples"] if e["caption"] in train_captions]
    assert hybrid["consensus"]["retrieved_pct"] > 0 and retrieved
    # Without --consensus-pool the options are refused before anything loads; a generator is no retrieval model.
    assert main([*base[:-4], "--out", str(tmp_path / "refused")]) != 0
    from transresnet.checkpoint import CheckpointError
    from transresnet.generation.evaluate import run_generate_eval
    from transresnet.options import EvalOptions

    flags = dict(checkpoint=generator, data=synthetic_dataset, split="val", protocol="generate", consensus=generator,
                 consensus_pool=synthetic_dataset)
    with pytest.raises(CheckpointError, match="is a caption generator: --consensus takes a retrieval checkpoint"):
        run_generate_eval(EvalOptions(**flags))
    with pytest.raises(FileNotFoundError, match="--consensus-pool .* not found"):
        run_generate_eval(EvalOptions(**{**flags, "consensus_pool": tmp_path / "missing.csv"}))
    with pytest.raises(CheckpointError, match="--consensus .* not found"):
        run_generate_eval(EvalOptions(**{**flags, "consensus": tmp_path / "missing"}))
