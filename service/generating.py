"""Generation beside retrieval: the served caption generator, its micro-batched beam search, and the
hybrid re-ranking of generated and retrieved captions by the retrieval model's score.

The generator is a checkpoint of the generative family (ShowTell, ShowAttTell, UpDown; ``transresnet
train`` with such a config). It is loaded once at start-up and kept across reloads of the retrieval pair.
Its photos go through its own preprocessing (its backbone may differ from the retrieval model's), decoded
from the same upload by the one image path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from transresnet.config import DecodingConfig

from .bundle import Bundle

if TYPE_CHECKING:
    from transresnet.generation.checkpoint import GeneratorCheckpoint
    from transresnet.generation.consensus import ConsensusRanker
    from transresnet.images import ImagePreprocessor
    from transresnet.traits import TraitVocab

logger = logging.getLogger(__name__)

Source = Literal["retrieved", "generated", "both"]


def describe_generator(checkpoint: GeneratorCheckpoint) -> str:
    """'flickr8k_updown: updown (lstm) decoder over mobilenetv2_100 grid features, trained on captions.csv
    in flickr8k-1k/, no personality input'."""
    config = checkpoint.config
    parts = [f"{config.model.family} ({config.model.decoder.cell}) decoder over {config.model.image.backbone} "
             "grid features"]
    if config.data.train:
        train = Path(config.data.train)
        parts.append(f"trained on {train.name} in {train.parent.name or '.'}/")
    count = len(checkpoint.model.traits.names) if checkpoint.model.use_traits else 0
    parts.append(f"{count} personalities" if count else "no personality input")
    return f"{config.name}: " + ", ".join(parts)


@dataclass(frozen=True, eq=False)
class Generator:
    """One loaded caption generator and its preprocessing."""

    checkpoint: GeneratorCheckpoint
    preprocessor: ImagePreprocessor
    loaded_at: float = field(default_factory=time.time)

    @property
    def traits(self) -> TraitVocab:
        return self.checkpoint.model.traits

    @property
    def uses_traits(self) -> bool:
        return self.checkpoint.model.use_traits

    @property
    def default_decoding(self) -> DecodingConfig:
        return self.checkpoint.config.model.decoder.decoding

    @property
    def info(self) -> dict[str, Any]:
        config, meta = self.checkpoint.config, self.checkpoint.meta
        weights_sha = meta.get("files", {}).get("model.safetensors", "")
        decoding = self.default_decoding
        return {"name": config.name, "family": config.model.family, "cell": config.model.decoder.cell,
                "version": (weights_sha or meta.get("fingerprint", ""))[:12],
                "description": describe_generator(self.checkpoint),
                "personalities": len(self.traits.names) if self.uses_traits else 0,
                "beam_size": decoding.beam_size, "max_length": decoding.max_length}

    def decoding(self, beam_size: int | None, max_length: int | None) -> DecodingConfig:
        """Beam search with the checkpoint's decoding settings, beam size and length as asked."""
        default = self.default_decoding
        return default.model_copy(update={"method": "beam", "beam_size": beam_size or default.beam_size,
                                          "max_length": max_length or default.max_length})

    def slots(self, names: Sequence[str]) -> list[int]:
        """Trait slots for the generator (all 0 when it has no personality input); unknown names raise
        ``UnknownTraitError``."""
        return self.checkpoint.model.trait_slots(list(names))


def load_generator_bundle(path: Path, *, device: str = "auto") -> Generator:
    """Load and verify a generator checkpoint (blocking)."""
    from transresnet.devices import resolve_device
    from transresnet.fusion import check_sample, folded_for_inference
    from transresnet.generation.checkpoint import load_generator
    from transresnet.images import ImagePreprocessor

    start = time.perf_counter()
    checkpoint = load_generator(path, device=resolve_device(device))
    model = checkpoint.model
    # Serving only: the frozen batch norms folded into the convolutions (checked on a sample), channels-last.
    sample = check_sample(checkpoint.config.model.image.image_size).to(model.device)
    model.backbone = folded_for_inference(model.backbone, sample).to(memory_format=torch.channels_last)
    generator = Generator(checkpoint, ImagePreprocessor(checkpoint.config.model.image))
    logger.info("loaded caption generator %s (%s) in %.1fs", path, generator.info["description"],
                time.perf_counter() - start)
    return generator


@dataclass(frozen=True)
class GenerateJob:
    generator: Generator
    pixels: torch.Tensor
    """One photo preprocessed for the generator's backbone (3, H, W)."""
    trait_ids: tuple[int, ...]
    options: DecodingConfig
    n_best: int


@dataclass(frozen=True)
class Generated:
    caption: str
    score: float
    """The beam's log-probability under the length penalty (what beam search ranks by)."""
    logprob: float


@dataclass
class Generation:
    beams: list[list[Generated]]
    """Per trait of the job, its finished beams, best first."""
    steps: int
    """Decoder steps the batch holding this job ran."""


def _decode_group(jobs: Sequence[GenerateJob]) -> list[Generation]:
    from transresnet.generation.decoding import DecodeStats, beam_search

    model = jobs[0].generator.checkpoint.model
    counts = torch.tensor([len(job.trait_ids) for job in jobs])
    traits = torch.tensor([slot for job in jobs for slot in job.trait_ids], dtype=torch.long, device=model.device)
    stats = DecodeStats()
    with torch.inference_mode():
        grid = model.grid(torch.stack([job.pixels for job in jobs]))  # one backbone pass per photo
        rows = grid.repeat_interleave(counts.to(grid.device), dim=0)
        hyps = beam_search(model.decoder, rows, traits, jobs[0].options, n_best=jobs[0].n_best, stats=stats)
    beams = [[Generated(model.vocab.decode(h.tokens), h.score, h.logprob) for h in row] for row in hyps]
    out, start = [], 0
    for job in jobs:
        out.append(Generation(beams[start:start + len(job.trait_ids)], stats.steps))
        start += len(job.trait_ids)
    return out


def generate_jobs(jobs: Sequence[GenerateJob]) -> list[Generation]:
    """Beam search for every (photo, trait) of the jobs, one decode per generator and decoding setting:
    rows decode independently, so a batch gives each job what it would get alone."""
    out: list[Generation | None] = [None] * len(jobs)
    groups: dict[tuple[int, str, int], list[int]] = {}
    for pos, job in enumerate(jobs):
        groups.setdefault((id(job.generator), job.options.model_dump_json(), job.n_best), []).append(pos)
    for positions in groups.values():
        for pos, result in zip(positions, _decode_group([jobs[p] for p in positions]), strict=True):
            out[pos] = result
    return [result for result in out if result is not None]


@dataclass(frozen=True)
class RescoreJob:
    bundle: Bundle
    queries: np.ndarray
    """One retrieval query vector per trait (n, D)."""
    texts: tuple[tuple[str, ...], ...]
    """Per trait, the candidate captions to score against its query."""


def rescore_jobs(jobs: Sequence[RescoreJob]) -> list[list[np.ndarray]]:
    """The retrieval model's score (query . caption vector, float32 text encoding) of every candidate; the
    texts of all jobs on one bundle are encoded together, each distinct text once."""
    from transresnet.encode import encode_captions

    out: list[list[np.ndarray]] = [[] for _ in jobs]
    by_bundle: dict[int, list[int]] = {}
    for pos, job in enumerate(jobs):
        by_bundle.setdefault(id(job.bundle), []).append(pos)
    for positions in by_bundle.values():
        texts = list(dict.fromkeys(t for p in positions for row in jobs[p].texts for t in row))
        vectors = encode_captions(jobs[positions[0]].bundle.checkpoint.model, texts, precision="float32",
                                  progress=False)
        where = {text: i for i, text in enumerate(texts)}
        for pos in positions:
            job = jobs[pos]
            out[pos] = [vectors[[where[t] for t in row]] @ job.queries[i] if row else np.zeros(0, np.float32)
                        for i, row in enumerate(job.texts)]
    return out


@dataclass(frozen=True)
class Candidate:
    """One caption of an answer, whichever way it was found."""

    id: str
    caption: str
    score: float
    source: Source
    metadata: dict[str, Any] = field(default_factory=dict)
    generation_score: float | None = None
    """The beam score, for generated captions."""


def generated_candidates(beams: Sequence[Generated], k: int) -> list[Candidate]:
    """Mode ``generate``: the best ``k`` beams, scored by beam search."""
    return [Candidate(f"generated-{rank}", beam.caption, beam.score, "generated", generation_score=beam.score)
            for rank, beam in enumerate(beams[:k], start=1)]


def consensus_scores(ranker: ConsensusRanker, rows: Sequence[tuple[Sequence[str], Sequence[str], Sequence[str]]]
                     ) -> list[np.ndarray]:
    """Per personality (retrieved candidates, generated candidates, neighbours): every candidate's CIDEr-D
    agreement with the neighbours, the retrieved ones first, as :func:`hybrid_candidates` takes them. Blocking."""
    return [np.asarray(ranker.scores([*retrieved, *generated], neighbours), np.float32)
            for retrieved, generated, neighbours in rows]


def hybrid_candidates(hits: Sequence[Any], beams: Sequence[Generated], scores: np.ndarray, k: int) -> list[Candidate]:
    """Mode ``hybrid`` (and ``generate`` with consensus, without hits): the retrieved hits and the generated
    beams, all scored by one judge, the retrieval model or consensus (``scores``: the hits' texts first, then
    the beams'), best ``k``. A beam that repeats a retrieved caption (same text key) is one candidate, marked
    ``both``."""
    from transresnet.keys import text_key

    candidates: dict[str, Candidate] = {}
    for hit, score in zip(hits, scores[:len(hits)], strict=True):
        candidates.setdefault(text_key(hit.caption), Candidate(str(hit.id), hit.caption, float(score), "retrieved",
                                                               dict(hit.metadata or {})))
    for rank, (beam, score) in enumerate(zip(beams, scores[len(hits):], strict=True), start=1):
        key = text_key(beam.caption)
        if key in candidates:
            seen = candidates[key]
            if seen.source == "retrieved":
                candidates[key] = Candidate(seen.id, seen.caption, seen.score, "both", seen.metadata, beam.score)
            continue
        candidates[key] = Candidate(f"generated-{rank}", beam.caption, float(score), "generated",
                                    generation_score=beam.score)
    ranked = sorted(candidates.values(), key=lambda c: c.score, reverse=True)
    return [c for c in ranked if np.isfinite(c.score)][:k]
