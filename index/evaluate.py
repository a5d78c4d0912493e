"""`transresnet eval`: the core evaluator plus, for the pool protocol, the same search through a caption index.

The pool's captions are searched through a published caption index (one given with ``--index``, or one
of ``--index-type`` built over the split's captions), side by side with exact search over the same
vectors, so the table shows the recall the approximate index loses. Caption->image search uses an
index of the same type over the query vectors, built and tuned by the same code.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from transresnet.checkpoint import Checkpoint
from transresnet.encode import encode_captions
from transresnet.evaluate import (
    C2I,
    CURVE_K,
    I2C,
    EvalInputs,
    Row,
    build_report,
    eval_candidates,
    exact_rows,
    make_row,
    mean_row,
    prepare,
    ranks_from_search,
    transpose_gold,
    write_report,
)
from transresnet.keys import text_key
from transresnet.options import EvalOptions
from transresnet.retrieval import RankingTask

from . import faiss_index as fx
from .build import BuildOptions, build_and_tune, checkpoint_info, write_version
from .captions import CaptionTable
from .search import CaptionIndex, load_index

logger = logging.getLogger(__name__)


@dataclass
class CaptionSide:
    """The caption pool of the pool protocol, as a caption index and the exact vectors of its rows."""

    index: CaptionIndex
    exact_vectors: np.ndarray  # float32 vectors of the same captions, row i = index row i
    gold: list[np.ndarray]  # per query: index rows of its gold captions
    label: str
    info: dict[str, Any]


def _caption_table(texts: list[str]) -> CaptionTable:
    return CaptionTable(captions=list(texts), ids=[str(i) for i in range(len(texts))], source="eval split",
                        format="eval", rows_read=len(texts))


def _params_label(kind: str, params: dict[str, Any]) -> str:
    detail = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return kind + (f" ({detail})" if detail else "")


def _index_info(manifest: dict[str, Any]) -> dict[str, Any]:
    index = manifest["index"]
    return {"type": index["type"], "factory": index["factory"], "search_params": index.get("search_params"),
            "tuning": {k: index.get("tuning", {}).get(k) for k in ("recall", "target", "k", "reached", "queries")},
            "count": manifest["count"], "version": manifest.get("version")}


def built_caption_side(checkpoint: Checkpoint, task: RankingTask, text_vectors: np.ndarray, options: EvalOptions,
                       root: Path) -> CaptionSide:
    """Publish the split's captions as an index version of ``options.index_type`` and load it back."""
    build = BuildOptions(index_type=options.index_type, keep=1, precision=options.precision,
                         recall_target=options.recall_target, seed=options.seed)
    started = time.perf_counter()
    write_version(root, vectors=text_vectors, table=_caption_table(task.texts),
                  checkpoint_info=checkpoint_info(checkpoint), options=build)
    caption_index = load_index(root, checkpoint=checkpoint)
    manifest = caption_index.manifest
    info = {"source": "built for this evaluation", "path": str(caption_index.path),
            "build_seconds": round(time.perf_counter() - started, 3), **_index_info(manifest)}
    label = _params_label(manifest["index"]["type"], manifest["index"].get("search_params") or {})
    return CaptionSide(caption_index, text_vectors, list(task.gold), label, info)


def prebuilt_caption_side(checkpoint: Checkpoint, task: RankingTask, options: EvalOptions) -> CaptionSide:
    """A published index: its captions are the pool (split captions plus any others, as distractors)."""
    assert options.index is not None
    caption_index = load_index(options.index, checkpoint=checkpoint)
    captions = caption_index.caption_texts()
    rows: dict[str, int] = {}
    for row, text in enumerate(captions):
        rows.setdefault(text_key(text), row)
    missing = [t for t in task.texts if text_key(t) not in rows]
    if missing:
        raise ValueError(f"index {caption_index.path} lacks {len(missing)} of the split's {len(task.texts)} captions "
                         f"(e.g. {missing[0]!r}); build one that holds them: transresnet index build "
                         f"--checkpoint {checkpoint.path} --captions {options.data} --out INDEX_ROOT")
    text_row = np.array([rows[text_key(t)] for t in task.texts], dtype=np.int64)
    gold = [np.unique(text_row[g]) for g in task.gold]
    logger.info("encoding the index's %d captions for the exact reference", len(captions))
    exact = encode_captions(checkpoint.model, captions, batch_size=options.batch_size, precision="float32")
    manifest = caption_index.manifest
    info = {"source": "prebuilt", "path": str(caption_index.path), **_index_info(manifest)}
    label = _params_label(manifest["index"]["type"], manifest["index"].get("search_params") or {}) + ", prebuilt"
    return CaptionSide(caption_index, exact, gold, label, info)


def _image_side_index(vectors: np.ndarray, index_type: str, options: EvalOptions
                      ) -> tuple[faiss.Index, str, dict[str, Any]]:
    """The caption->image database: query vectors in an index of the same type (same build and tuning code)."""
    spec = fx.resolve_spec(fx.IndexSpec(type=index_type), len(vectors), vectors.shape[1])
    build = BuildOptions(index_type=index_type, recall_target=options.recall_target,
                         recall_k=min(10, max(1, len(vectors) - 1)), seed=options.seed)
    index, tuning, _ = build_and_tune(np.ascontiguousarray(vectors, dtype=np.float32), spec, build)
    index = fx.to_gpu(index) or index
    return index, _params_label(index_type, tuning.params), {
        "type": index_type, "factory": spec.factory(vectors.shape[1]), "search_params": tuning.params,
        "tuning": {"recall": tuning.recall, "target": tuning.target, "k": tuning.k, "reached": tuning.reached},
        "count": len(vectors)}


def eval_pool(inputs: EvalInputs, options: EvalOptions, work_dir: Path) -> tuple[list[Row], dict[str, Any]]:
    """Exact and index search, both directions; returns the rows and what was searched."""
    checkpoint, task, queries, texts = inputs.checkpoint, inputs.task, inputs.queries, inputs.texts
    side = (prebuilt_caption_side(checkpoint, task, options) if options.index is not None
            else built_caption_side(checkpoint, task, texts, options, work_dir / "caption-index"))
    timings: dict[str, float] = {}

    started = time.perf_counter()
    exact = exact_rows(task, queries, texts, captions=(side.exact_vectors, side.gold))
    timings["exact_search_s"] = time.perf_counter() - started

    k_text = min(CURVE_K, len(side.index))
    if side.index.on_gpu:
        k_text = min(k_text, fx.GPU_MAX_K)
    started = time.perf_counter()
    scores, ids = side.index.search_ids(queries, k_text)
    timings["index_search_s"] = time.perf_counter() - started
    timings["index_queries_per_s"] = len(queries) / max(timings["index_search_s"], 1e-9)
    approx_i2c = make_row(I2C, side.label, ranks_from_search(scores, ids, side.gold), searched_k=k_text)

    image_index, image_label, image_info = _image_side_index(queries, side.info["type"], options)
    k_image = min(CURVE_K, len(queries))
    scores, ids = image_index.search(np.ascontiguousarray(texts, dtype=np.float32), k_image)
    text_gold = transpose_gold(task.gold, len(task.texts))
    approx_c2i = make_row(C2I, image_label, ranks_from_search(scores, ids, text_gold), searched_k=k_image)

    rows = [*exact, approx_i2c, approx_c2i, mean_row([approx_i2c, approx_c2i], side.info["type"])]
    searched = {"caption_index": side.info, "image_index": image_info,
                "searched_k": {I2C: k_text, C2I: k_image}, "seconds": {k: round(v, 4) for k, v in timings.items()}}
    return rows, searched


def run_eval(options: EvalOptions) -> dict[str, Any]:
    """Evaluate a checkpoint; writes eval.json, eval.md and recall_at_k.png to ``options.out`` if set."""
    total_start = time.perf_counter()
    inputs = prepare(options)
    seconds = dict(inputs.seconds)
    searched: dict[str, Any] = {}
    if options.protocol == "pool":
        if options.out is not None:
            rows, searched = eval_pool(inputs, options, Path(options.out))
        else:
            with tempfile.TemporaryDirectory(prefix="transresnet-eval-") as tmp:
                rows, searched = eval_pool(inputs, options, Path(tmp))
    else:
        started = time.perf_counter()
        rows = eval_candidates(inputs.task, inputs.queries, inputs.texts)
        seconds["exact_search_s"] = time.perf_counter() - started
    seconds.update(searched.pop("seconds", {}))
    seconds["total_s"] = time.perf_counter() - total_start
    report = build_report(options, inputs, rows, searched, seconds)
    if options.out is not None:
        write_report(report, Path(options.out))
    return report
