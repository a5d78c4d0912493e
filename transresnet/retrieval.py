"""Ranking tasks built from caption records, and exact scoring of a task.

Two protocols:

- *candidates* (Personality-Captions, ParlAI): each record carries its own candidate list; a hit is any
  gold caption (the comment plus ``additional_captions``) within the top k.
- *pool* (COCO / Flickr30k): each distinct (image, personality) is a query ranked against every distinct
  caption of the split; the gold captions are the ones written for that image and personality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transresnet.data import CaptionRecord
from transresnet.metrics import gold_ranks


@dataclass
class RankingTask:
    protocol: str
    query_images: list[Path]
    query_traits: list[str | None]
    texts: list[str]
    """Every distinct candidate caption; candidates and golds index into it."""
    gold: list[np.ndarray]
    """Per query: indices of its gold captions."""
    candidates: list[np.ndarray] | None = None
    """Per query: indices of its candidate list (candidates protocol); None ranks all texts."""

    def __len__(self) -> int:
        return len(self.query_images)


class _TextIndex:
    def __init__(self) -> None:
        self.texts: list[str] = []
        self._ids: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        if text not in self._ids:
            self._ids[text] = len(self.texts)
            self.texts.append(text)
        return self._ids[text]


def has_candidates(records: Sequence[CaptionRecord]) -> bool:
    return bool(records) and all(r.candidates for r in records)


def candidates_task(records: Sequence[CaptionRecord], *, use_500: bool = False) -> RankingTask:
    """One query per record, ranked against its own 100 (or 500) candidates."""
    text_id = _TextIndex()
    gold, candidates = [], []
    for record in records:
        pool = record.candidates_500 if use_500 else record.candidates
        if not pool:
            which = "500_candidates" if use_500 else "candidates"
            raise ValueError(f"record for image {record.image_id} has no {which}; use the pool protocol")
        golds = {record.caption, *record.additional_captions}
        cand_ids = np.array([text_id(c) for c in pool])
        gold_ids = np.array([text_id(c) for c in dict.fromkeys(pool) if c in golds])
        if gold_ids.size == 0:
            raise ValueError(f"candidates of image {record.image_id} do not contain its gold caption")
        candidates.append(cand_ids)
        gold.append(gold_ids)
    return RankingTask("candidates", [r.image_path for r in records], [r.personality for r in records],
                       text_id.texts, gold, candidates)


def pool_task(records: Sequence[CaptionRecord]) -> RankingTask:
    """One query per distinct (image, personality), ranked against every distinct caption."""
    text_id = _TextIndex()
    groups: dict[tuple[Path, str | None], list[int]] = {}
    for record in records:
        groups.setdefault((record.image_path, record.personality), []).append(text_id(record.caption))
    images = [image for image, _ in groups]
    traits = [trait for _, trait in groups]
    gold = [np.array(sorted(set(ids))) for ids in groups.values()]
    return RankingTask("pool", images, traits, text_id.texts, gold)


def task_for(records: Sequence[CaptionRecord], protocol: str = "auto") -> RankingTask:
    if protocol == "auto":
        protocol = "candidates" if has_candidates(records) else "pool"
    if protocol == "candidates":
        return candidates_task(records)
    if protocol == "candidates500":
        return candidates_task(records, use_500=True)
    if protocol == "pool":
        return pool_task(records)
    raise ValueError(f"unknown protocol {protocol!r}; valid: auto, candidates, candidates500, pool")


def _tensor(vectors: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(vectors).float().cpu()


def pool_ranks(queries: torch.Tensor | np.ndarray, texts: torch.Tensor | np.ndarray, gold: Sequence[np.ndarray],
               *, chunk: int = 1024) -> np.ndarray:
    """Exact 1-based rank of each query's best gold among all ``texts`` (inner-product scores)."""
    queries, texts = _tensor(queries), _tensor(texts)
    ranks = []
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk] @ texts.T
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for row, ids in enumerate(gold[start:start + chunk]):
            mask[row, torch.as_tensor(ids, dtype=torch.long)] = True
        ranks.append(gold_ranks(scores, mask))
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)


def rank_task(task: RankingTask, queries: torch.Tensor | np.ndarray, texts: torch.Tensor | np.ndarray, *,
              chunk: int = 1024) -> np.ndarray:
    """Exact 1-based rank of the best gold caption for every query (inner-product scores)."""
    if task.candidates is None:
        return pool_ranks(queries, texts, task.gold, chunk=chunk)
    queries, texts = _tensor(queries), _tensor(texts)
    ranks = []
    for q, (candidates, gold) in enumerate(zip(task.candidates, task.gold, strict=True)):
        scores = (texts[torch.as_tensor(candidates)] @ queries[q]).unsqueeze(0)
        ranks.append(gold_ranks(scores, torch.as_tensor(np.isin(candidates, gold)).unsqueeze(0)))
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)
