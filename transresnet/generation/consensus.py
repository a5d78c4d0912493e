"""Consensus re-ranking of generated captions (Devlin et al. 2015, "Exploring Nearest Neighbor Approaches for
Image Captioning"): the retrieval model finds the photo's ``k`` nearest captions in a caption pool, and each
candidate is scored by its CIDEr-D against those neighbours; the best-agreeing candidate is the answer.

Beam search ranks captions by the decoder's own likelihood, which favours short generic phrases; the
neighbours are what captions of similar photos actually say, so agreement with them is a second, independent
estimate of what the references will say. Candidates are the generator's n-best (``generated``) or those
and the neighbours themselves (``hybrid``; a neighbour is never compared with itself).

Document frequencies come from the pool, each caption its own document, so a caption's score does not depend
on what else is in the batch (the same in evaluation and in the service). Captions of the photos being
evaluated must not be in the pool: :func:`load_consensus_pool` leaves them out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transresnet.data import CaptionRecord, load_dataset
from transresnet.generation.data import exclude_images
from transresnet.generation.metrics import CiderD
from transresnet.generation.vocab import normalize

logger = logging.getLogger(__name__)


@dataclass
class ConsensusPool:
    captions: list[str]
    """Distinct pool captions that may serve as neighbours."""
    excluded: int
    """Pool captions of held-out (evaluated) photos, left out."""


@dataclass(frozen=True)
class Choice:
    caption: str
    consensus: float
    """CIDEr-D (x 100) against the neighbours."""
    source: str
    """``generated`` or ``retrieved``."""


def load_consensus_pool(path: str | Path, held_out: Sequence[CaptionRecord]) -> ConsensusPool:
    """The pool file's distinct captions without those of ``held_out`` photos (by image file name or stem)."""
    records = load_dataset(path, require_images=False).records
    kept, excluded = exclude_images(records, held_out)
    captions = list(dict.fromkeys(r.caption for r in kept))
    if not captions:
        raise ValueError(f"{path} has no captions left after excluding the {excluded} of the evaluated photos; "
                         "give a pool with captions of other photos")
    logger.info("consensus pool %s: %d distinct captions; %d captions of the evaluated photos excluded",
                path, len(captions), excluded)
    return ConsensusPool(captions, excluded)


def nearest_captions(queries: np.ndarray, caption_vectors: np.ndarray, captions: Sequence[str],
                     k: int) -> list[list[str]]:
    """The ``k`` captions of highest score (query . caption) per query row, best first (exact search)."""
    k = min(k, len(captions))
    scores = torch.from_numpy(np.ascontiguousarray(queries)) @ torch.from_numpy(caption_vectors).T
    top = scores.topk(k, dim=1).indices.tolist()
    return [[captions[j] for j in row] for row in top]


class ConsensusRanker:
    """CIDEr-D agreement with a photo's neighbour captions, on document frequencies fixed by a caption pool."""

    def __init__(self, pool: Sequence[str]) -> None:
        self.cider = CiderD([[c] for c in pool], keep_references=False)

    def scores(self, candidates: Sequence[str], neighbours: Sequence[str]) -> list[float]:
        """CIDEr-D (x 100) of each candidate against the neighbours; a candidate is never compared with a
        neighbour of the same text (a retrieved caption would otherwise vouch for itself)."""
        witnesses = [(normalize(n), self.cider.vector(n)) for n in neighbours]  # each neighbour vectorised once
        done: dict[str, float] = {}
        for caption in candidates:
            key = normalize(caption)
            if key not in done:
                others = [vector for text, vector in witnesses if text != key]
                done[key] = 100.0 * self.cider.score_vectors(self.cider.vector(caption), others)
        return [done[normalize(caption)] for caption in candidates]

    def rank(self, generated: Sequence[str], neighbours: Sequence[str], *, hybrid: bool = False) -> list[Choice]:
        """The candidates (``generated``, plus the neighbours when ``hybrid``) best-agreeing first; ties keep
        the given order (beam order, then retrieval order)."""
        pairs = [(c, "generated") for c in generated] + ([(c, "retrieved") for c in neighbours] if hybrid else [])
        firsts: dict[str, tuple[str, str]] = {}
        for caption, source in pairs:
            firsts.setdefault(normalize(caption), (caption, source))
        kept = list(firsts.values())
        scores = self.scores([caption for caption, _ in kept], neighbours)
        choices = [Choice(caption, score, source) for (caption, source), score in zip(kept, scores, strict=True)]
        return sorted(choices, key=lambda c: c.consensus, reverse=True)
