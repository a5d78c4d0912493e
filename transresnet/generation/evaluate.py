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

from transresnet.config import DecodingConfig
from transresnet.data import CaptionRecord, load_dataset
from transresnet.devices import resolve_device
from transresnet.evaluate import load_records
from transresnet.generation.checkpoint import CaptionModel
from transresnet.generation.data import Query, grid_features, group_queries
from transresnet.generation.ensemble import load_ensemble
from transresnet.generation.metrics import METRIC_KEYS, VoiceClassifier, caption_scores, vocabulary_usage
from transresnet.options import EvalOptions
from transresnet.runtime import utc_timestamp
from transresnet.tables import format_table

logger = logging.getLogger(__name__)

EXAMPLES = 20
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
    checkpoint = load_ensemble([options.checkpoint, *(options.ensemble or [])], device=resolve_device(options.device))
    model = checkpoint.model
    queries = group_queries(load_records(options))
    decoding = checkpoint.config.model.decoder.decoding
    if options.beam_size is not None:
        decoding = decoding.model_copy(update={"method": "beam", "beam_size": options.beam_size})
    paths = list(dict.fromkeys(q.image_path for q in queries))
    rows = {p: i for i, p in enumerate(paths)}
    features = grid_features(model, paths, root=options.feature_cache or checkpoint.config.data.feature_cache,
                             batch_size=min(options.batch_size, 64))
    slots = query_slots(model, queries, options.traits, options.seed)
    decode_start = time.perf_counter()
    captions = caption_rows(model, features, [rows[q.image_path] for q in queries], slots, decoding,
                            batch_size=options.batch_size, seed=options.seed)
    decode_s = time.perf_counter() - decode_start
    train = _training_records(model)
    metrics = score_queries(queries, captions, training_captions=[r.caption for r in train],
                            voices=voice_classifier(train), meteor=shutil.which("java") is not None)
    report = {
        "protocol": "generate", "checkpoint": str(options.checkpoint),
        "ensemble": [str(p) for p in options.ensemble or []], "family": checkpoint.config.model.family,
        "cell": checkpoint.config.model.decoder.cell, "data": str(options.data), "split": options.split,
        "traits": options.traits, "decoding": decoding.model_dump(mode="json"), **metrics,
        "examples": [{"image": q.image_id, "trait": q.trait, "caption": c, "references": list(q.references[:3])}
                     for q, c in list(zip(queries, captions, strict=True))[:EXAMPLES]],
        "seconds": {"decode_s": round(decode_s, 2), "total_s": round(time.perf_counter() - started, 2)},
        "created": utc_timestamp(),
    }
    if options.out is not None:
        write_report(report, Path(options.out))
    return report


def metric_table(report: dict[str, Any]) -> str:
    keys = [k for k in (*METRIC_KEYS, "meteor", "distinct_words", "novel_pct", "voice_accuracy")
            if report.get(k) is not None]
    return format_table(["metric", "value"], [[k, f"{report[k]:.2f}"] for k in keys], numeric=True)


def format_markdown(report: dict[str, Any]) -> str:
    decoding = report["decoding"]
    how = (f"beam {decoding['beam_size']}, length penalty {decoding['length_penalty']}"
           if decoding["method"] == "beam" else decoding["method"])
    keys = [k for k in (*METRIC_KEYS, "meteor", "distinct_words", "novel_pct", "voice_accuracy")
            if report.get(k) is not None]
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
