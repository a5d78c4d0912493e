"""Recall@k and ranks against a plain Python reference, ties included."""

import numpy as np
import pytest

from transresnet.metrics import gold_ranks, recall_at_k, summarize_ranks


def reference_rank(scores: list[float], gold: list[bool]) -> int:
    """Sort by score, wrong answers first among equals; 1-based position of the first gold."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], gold[i]))
    return next(pos for pos, i in enumerate(order, start=1) if gold[i])


@pytest.mark.parametrize("seed", range(5))
def test_gold_ranks_match_reference_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=(40, 30)).astype(np.float32)  # small integer range: many ties
    gold = rng.random((40, 30)) < 0.1
    gold[np.arange(40), rng.integers(0, 30, 40)] = True
    expected = [reference_rank(list(s), list(g)) for s, g in zip(scores, gold, strict=True)]
    assert gold_ranks(scores, gold).tolist() == expected


def test_recall_and_median() -> None:
    ranks = np.array([1, 2, 5, 6, 11, 1])
    summary = summarize_ranks(ranks)
    assert summary["R@1"] == pytest.approx(100 * 2 / 6)
    assert summary["R@5"] == pytest.approx(100 * 4 / 6)
    assert summary["R@10"] == pytest.approx(100 * 5 / 6)
    assert summary["median_rank"] == 3.5
    assert recall_at_k(ranks, ks=(50,)) == {"R@50": 100.0}


def test_all_equal_scores_get_no_credit() -> None:
    scores = np.zeros((1, 10))
    gold = np.zeros((1, 10), bool)
    gold[0, 0] = True
    assert gold_ranks(scores, gold).tolist() == [10]


def test_query_without_gold_is_an_error() -> None:
    with pytest.raises(ValueError, match="gold"):
        gold_ranks(np.zeros((2, 3)), np.array([[True, False, False], [False, False, False]]))
