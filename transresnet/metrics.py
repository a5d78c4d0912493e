"""Retrieval metrics: rank of the best gold candidate, recall@k, median rank.

Ties are broken pessimistically: a wrong candidate scoring exactly as high as the best gold ranks
above it, so a model that scores everything equally gets no credit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10)


def gold_ranks(scores: torch.Tensor | np.ndarray, gold: torch.Tensor | np.ndarray) -> np.ndarray:
    """1-based rank of the best-scoring gold candidate in each row.

    ``scores`` (Q, C); ``gold`` (Q, C) boolean, at least one True per row.
    """
    scores_t = torch.as_tensor(scores, dtype=torch.float32)
    gold_t = torch.as_tensor(gold, dtype=torch.bool)
    if scores_t.shape != gold_t.shape:
        raise ValueError(f"scores {tuple(scores_t.shape)} and gold {tuple(gold_t.shape)} differ in shape")
    if not bool(gold_t.any(dim=1).all()):
        raise ValueError("every query needs at least one gold candidate")
    best_gold = scores_t.masked_fill(~gold_t, float("-inf")).max(dim=1, keepdim=True).values
    beaten_by = ((scores_t >= best_gold) & ~gold_t).sum(dim=1)
    return (beaten_by + 1).numpy()


def recall_at_k(ranks: Sequence[int] | np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Percentage of queries whose best gold ranks within k, as {'R@1': ..., 'R@5': ...}."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("recall of zero queries is undefined")
    return {f"R@{k}": float((ranks <= k).mean() * 100.0) for k in ks}


def summarize_ranks(ranks: Sequence[int] | np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@k plus median and mean rank and the number of queries."""
    ranks = np.asarray(ranks)
    summary = recall_at_k(ranks, ks)
    summary["median_rank"] = float(np.median(ranks))
    summary["mean_rank"] = float(ranks.mean())
    summary["queries"] = int(ranks.size)
    return summary
