"""Scoring caption generators: captions for (image, trait) queries, BLEU / ROUGE-L / CIDEr-D against their
references, vocabulary usage, voice accuracy, and the ``--protocol generate`` report (JSON, markdown,
example captions)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transresnet.checkpoint import CheckpointError, load_checkpoint
from transresnet.config import DecodingConfig
from transresnet.data import CaptionRecord, load_dataset
from transresnet.devices import resolve_device
from transresnet.encode import encode_captions
from transresnet.evaluate import image_features, load_records, query_vectors, trait_slots
from transresnet.generation.checkpoint import CaptionModel, is_generator_checkpoint
from transresnet.generation.consensus import ConsensusRanker, load_consensus_pool, nearest_captions
from transresnet.generation.data import Query, grid_features, group_queries
from transresnet.generation.decoding import beam_search
from transresnet.generation.ensemble import load_ensemble
from transresnet.generation.metrics import METRIC_KEYS, VoiceClassifier, caption_scores, vocabulary_usage
from transresnet.options import EvalOptions
from transresnet.runtime import utc_timestamp
from transresnet.tables import format_table

logger = logging.getLogger(__name__)

EXAMPLES = 20
REPORTED_KEYS = (*METRIC_KEYS, "bleu_length_ratio", "meteor", "distinct_words", "novel_pct", "voice_accuracy")
"""The report's figures in its tables, where present."""
"""Queries whose captions the report shows."""


def caption_rows(model: CaptionModel, features: torch.Tensor, rows: Sequence[int], slots: Sequence[int],
                 options: DecodingConfig, *, batch_size: int = 100, seed: int = 0) -> list[str]:
    """A caption for each (feature row, trait slot), decoded in batches."""
    generator = torch.Generator().manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        grid = features[torch.as_tensor(rows[start:start + batch_size])]
        out += model.generate(grid, slots[start:start + batch_size], options, generator=generator)
    return out


def nbest_rows(model: CaptionModel, features: torch.Tensor, rows: Sequence[int], slots: Sequence[int],
               options: DecodingConfig, *, batch_size: int = 100) -> list[list[str]]:
    """Every finished beam (up to the beam size) per (feature row, trait slot), best first."""
    out: list[list[str]] = []
    for start in range(0, len(rows), batch_size):
        grid = features[torch.as_tensor(rows[start:start + batch_size])].to(model.device)
        traits = torch.as_tensor(list(slots[start:start + batch_size]), dtype=torch.long, device=model.device)
        hyps = beam_search(model.decoder, grid, traits, options, n_best=options.beam_size)
        out += [[model.vocab.decode(h.tokens) for h in row] for row in hyps]
    return out


def pool_neighbours(options: EvalOptions, queries: Sequence[Query], pool: Sequence[str]) -> list[list[str]]:
    """Each query's ``consensus_k`` nearest pool captions under the ``--consensus`` retrieval checkpoint."""
    retrieval = load_checkpoint(options.consensus, device=resolve_device(options.device))
    paths = list(dict.fromkeys(q.image_path for q in queries))
    row_of = {p: i for i, p in enumerate(paths)}
    features = image_features(retrieval, paths, feature_cache=options.feature_cache, batch_size=options.batch_size)
    slots = trait_slots(retrieval, [q.trait for q in queries], options.traits, options.seed)
    vectors = query_vectors(retrieval, features[[row_of[q.image_path] for q in queries]], slots, options.batch_size)
    texts = encode_captions(retrieval.model, pool, batch_size=options.batch_size, precision=options.precision)
    return nearest_captions(vectors, texts, pool, options.consensus_k)


def check_consensus_inputs(options: EvalOptions) -> None:
    """The --consensus checkpoint and pool exist and the checkpoint is a retrieval one: said before any decoding."""
    if options.consensus is None or options.consensus_pool is None:
        return
    if not options.consensus_pool.is_file():
        raise FileNotFoundError(f"--consensus-pool {options.consensus_pool} not found: give a caption CSV such as "
                                "../shared/data/flickr8k-captions/captions.csv")
    if not options.consensus.is_dir():
        raise CheckpointError(f"--consensus {options.consensus} not found: give a retrieval run's best/ "
                              "(e.g. runs/flickr8k/best)")
    if is_generator_checkpoint(options.consensus):
        raise CheckpointError(f"{options.consensus} is a caption generator: --consensus takes a retrieval checkpoint "
                              "(a TransResNet run's best/, e.g. runs/flickr8k/best)")


def consensus_choices(options: EvalOptions, queries: Sequence[Query], records: Sequence[CaptionRecord],
                      beams: Sequence[Sequence[str]]) -> tuple[list[str], dict[str, Any]]:
    """The best-agreeing caption per query (:mod:`transresnet.generation.consensus`) and what was done."""
    pool = load_consensus_pool(options.consensus_pool, records)
    neighbours = pool_neighbours(options, queries, pool.captions)
    ranker = ConsensusRanker(pool.captions)
    hybrid = options.consensus_candidates == "hybrid"
    choices = [ranker.rank(row, near, hybrid=hybrid)[0] for row, near in zip(beams, neighbours, strict=True)]
    info = {"retrieval": str(options.consensus), "pool": str(options.consensus_pool), "k": options.consensus_k,
            "candidates": options.consensus_candidates, "pool_captions": len(pool.captions),
            "excluded": pool.excluded,
            "retrieved_pct": 100.0 * sum(c.source == "retrieved" for c in choices) / len(choices),
            "not_top_beam_pct": 100.0 * sum(c.caption != row[0] for c, row in zip(choices, beams, strict=True))
            / len(choices)}
    return [c.caption for c in choices], info


def score_queries(queries: Sequence[Query], captions: Sequence[str], *, training_captions: Sequence[str] = (),
                  voices: VoiceClassifier | None = None, meteor: bool = False) -> dict[str, Any]:
    """Metrics of one caption per query, plus usage and (with ``voices``) voice accuracy."""
    refs = {i: q.references for i, q in enumerate(queries)}
    metrics: dict[str, Any] = caption_scores(refs, dict(enumerate(captions)), meteor=meteor)
    metrics.update(vocabulary_usage(captions, training_captions))
    if voices is not None:
        voiced = [(c, q.trait) for c, q in zip(captions, queries, strict=True) if q.trait]
        metrics["voice_accuracy"] = voices.accuracy([c for c, _ in voiced], [t for _, t in voiced])
    metrics["queries"] = len(queries)
    return metrics


def voice_classifier(records: Sequence[CaptionRecord]) -> VoiceClassifier | None:
    """A classifier of the training captions' voices, where the data has more than one trait."""
    voiced = [r for r in records if r.personality]
    if len({r.personality for r in voiced}) < 2:
        return None
    return VoiceClassifier([r.caption for r in voiced], [r.personality for r in voiced])


def query_slots(model: CaptionModel, queries: Sequence[Query], mode: str, seed: int) -> list[int]:
    slots = model.trait_slots([q.trait for q in queries])
    if mode == "shuffled":
        return [int(s) for s in np.random.default_rng(seed).permutation(slots)]
    return [0] * len(slots) if mode == "none" else slots


def _training_records(model: CaptionModel) -> list[CaptionRecord]:
    data = model.config.data
    if not data.train or not Path(data.train).exists():
        logger.info("the checkpoint's training data %s is not here: novelty and voice accuracy are skipped",
                    data.train)
        return []
    return load_dataset(data.train, split=data.train_split, image_dir=data.image_dir).records


def run_generate_eval(options: EvalOptions) -> dict[str, Any]:
    """``transresnet eval --protocol generate``: caption every (image, trait) query of the split and score it."""
    started = time.perf_counter()
    check_consensus_inputs(options)
    checkpoint = load_ensemble([options.checkpoint, *(options.ensemble or [])], device=resolve_device(options.device))
    model = checkpoint.model
    records = load_records(options)
    queries = group_queries(records)
    decoding = checkpoint.config.model.decoder.decoding
    if options.beam_size is not None:
        decoding = decoding.model_copy(update={"method": "beam", "beam_size": options.beam_size})
    paths = list(dict.fromkeys(q.image_path for q in queries))
    rows = {p: i for i, p in enumerate(paths)}
    features = grid_features(model, paths, root=options.feature_cache or checkpoint.config.data.feature_cache,
                             batch_size=min(options.batch_size, 64))
    slots = query_slots(model, queries, options.traits, options.seed)
    decode_start = time.perf_counter()
    query_rows = [rows[q.image_path] for q in queries]
    consensus: dict[str, Any] | None = None
    if options.consensus is None:
        captions = caption_rows(model, features, query_rows, slots, decoding, batch_size=options.batch_size,
                                seed=options.seed)
    else:
        decoding = decoding.model_copy(update={"method": "beam"})
        beams = nbest_rows(model, features, query_rows, slots, decoding, batch_size=options.batch_size)
        captions, consensus = consensus_choices(options, queries, records, beams)
    decode_s = time.perf_counter() - decode_start
    train = _training_records(model)
    metrics = score_queries(queries, captions, training_captions=[r.caption for r in train],
                            voices=voice_classifier(train), meteor=shutil.which("java") is not None)
    report = {
        "protocol": "generate", "checkpoint": str(options.checkpoint),
        "ensemble": [str(p) for p in options.ensemble or []], "family": checkpoint.config.model.family,
        "cell": checkpoint.config.model.decoder.cell, "data": str(options.data), "split": options.split,
        "traits": options.traits, "decoding": decoding.model_dump(mode="json"), "consensus": consensus, **metrics,
        "examples": [{"image": q.image_id, "trait": q.trait, "caption": c, "references": list(q.references[:3])}
                     for q, c in list(zip(queries, captions, strict=True))[:EXAMPLES]],
        # every query's caption, so that a report can be rescored or compared caption by caption
        "captions": [{"image": q.image_id, "trait": q.trait, "caption": c}
                     for q, c in zip(queries, captions, strict=True)],
        "seconds": {"decode_s": round(decode_s, 2), "total_s": round(time.perf_counter() - started, 2)},
        "created": utc_timestamp(),
    }
    if options.out is not None:
        write_report(report, Path(options.out))
    return report


def metric_table(report: dict[str, Any]) -> str:
    keys = [k for k in REPORTED_KEYS if report.get(k) is not None]
    return format_table(["metric", "value"], [[k, f"{report[k]:.2f}"] for k in keys], numeric=True)


def format_markdown(report: dict[str, Any]) -> str:
    decoding = report["decoding"]
    how = (f"beam {decoding['beam_size']}, length penalty {decoding['length_penalty']}"
           if decoding["method"] == "beam" else decoding["method"])
    keys = [k for k in REPORTED_KEYS if report.get(k) is not None]
    members = len(report.get("ensemble") or []) + 1
    ensemble = f", an ensemble of {members} checkpoints" if members > 1 else ""
    lines = [f"# {report['family']} ({report['cell']}{ensemble}) on {report['data']} split {report['split']}", "",
             f"{report['queries']} queries, traits {report['traits']}, {how}. Scores x 100 (CIDEr-D as "
             "pycocoevalcap's Cider, x 100).", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
             "| " + " | ".join(f"{report[k]:.2f}" for k in keys) + " |", "", "## Example captions", "",
             "| image | trait | generated | a reference |", "|---|---|---|---|"]
    for ex in report["examples"]:
        ref = ex["references"][0] if ex["references"] else ""
        lines.append(f"| {ex['image']} | {ex['trait'] or '-'} | {ex['caption']} | {ref} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "eval.json", "markdown": out / "eval.md"}
    files["json"].write_text(json.dumps(report, indent=1))
    files["markdown"].write_text(format_markdown(report))
    return files
