"""`transresnet eval`: recall of a checkpoint on a test split, written as a table, JSON, markdown and a plot.

Protocols:

- ``candidates`` / ``candidates500`` (Personality-Captions, ParlAI): each example is ranked against its own
  candidate list (100 with one gold, or 500 with five golds, ParlAI's ``--num-test-labels 5``); a hit@k is
  any gold within the top k; the median rank is that of the best-ranked gold.
- ``pool`` (COCO / Flickr30k): every distinct (image, personality) query ranks every distinct caption of
  the split (image->caption, any of its golds counts) and every caption ranks all queries (caption->image).
  Vectors come from ``index.encode`` (the service's encoding path); captions are searched through a
  published ``index/`` caption index, side by side with exact search over the same vectors, so the table
  shows the recall the approximate index loses.

Ranks are pessimistic about ties (a wrong caption scoring exactly like the best gold ranks above it), as
in :mod:`transresnet.metrics`. An approximate search returns at most ``k`` results: a gold it does not
return counts as rank ``k + 1``.

This module is an entry point: it sits on top of the core, ``index/`` and nothing imports it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transresnet.checkpoint import Checkpoint, load_checkpoint
from transresnet.data import CaptionRecord, load_dataset
from transresnet.devices import resolve_device
from transresnet.files import sha256_file
from transresnet.metrics import summarize_ranks
from transresnet.retrieval import RankingTask, candidates_task, pool_task, rank_task

logger = logging.getLogger(__name__)

PROTOCOLS = ("candidates", "candidates500", "pool")
TRAIT_MODES = ("given", "shuffled", "none")
INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
CURVE_K = 50
"""Recall@k is reported and plotted for k = 1..CURVE_K; approximate searches return this many results."""
REPORT_FILES = {"json": "eval.json", "markdown": "eval.md", "plot": "recall_at_k.png"}
I2C, C2I, MEAN = "image->caption", "caption->image", "mean"


@dataclass
class EvalOptions:
    """Everything one evaluation needs (the CLI flags of ``transresnet eval``)."""

    checkpoint: Path  # checkpoint directory (e.g. runs/x/best)
    data: Path  # CSV, Personality-Captions JSON or Karpathy dataset.json
    protocol: str = "pool"  # candidates | candidates500 | pool
    split: str | None = None  # CSV/Karpathy: the split to keep; Personality-Captions: its label
    image_dir: Path | None = None  # image folder when not the format's default
    out: Path | None = None  # where eval.json, eval.md and recall_at_k.png go (None: nothing written)
    index: Path | None = None  # pool: a published INDEX_ROOT to measure (else one is built, see index_type)
    index_type: str = "ivf"  # pool without --index: the index type built and compared with exact search
    traits: str = "given"  # given | shuffled (permuted across queries) | none (slot 0 for every query)
    feature_cache: str | None = None  # frozen backbones: feature cache root (default: the checkpoint's)
    batch_size: int = 256  # queries and captions per encoder batch
    precision: str = "float32"  # caption encoder precision (index.encode: auto | float32 | bfloat16 | float16)
    recall_target: float = 0.95  # approximate index: recall@10 against exact search it is tuned to
    device: str = "auto"
    seed: int = 0  # shuffled traits and index training samples

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.traits not in TRAIT_MODES:
            raise ValueError(f"unknown trait mode {self.traits!r}; choose one of {', '.join(TRAIT_MODES)}")
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index type {self.index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
        if self.index is not None and self.protocol != "pool":
            raise ValueError("--index only applies to the pool protocol (candidate lists are scored exactly)")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass
class Row:
    """One line of the results table: a direction searched one way."""

    direction: str  # image->caption | caption->image | mean
    search: str  # "exact", or the index type and its search parameters
    metrics: dict[str, float]  # R@1/5/10, median_rank, mean_rank, queries (not for the mean row)
    curve: list[float] = field(default_factory=list)  # recall@k for k = 1..len(curve)
    not_returned: int = 0  # queries whose golds were all outside the returned top k (approximate search)
    searched_k: int | None = None  # results asked of the search (ranks above it are censored)


# ---------------------------------------------------------------------------------------- inputs


def load_records(options: EvalOptions) -> list[CaptionRecord]:
    dataset = load_dataset(options.data, split=options.split, image_dir=options.image_dir)
    if not dataset.records:
        of_split = f" of split {options.split!r}" if options.split else ""
        raise ValueError(f"{options.data} holds no usable record{of_split} "
                         "(are the images where the file expects them? see --image-dir)")
    return dataset.records


def build_task(records: Sequence[CaptionRecord], protocol: str) -> RankingTask:
    if protocol == "pool":
        return pool_task(records)
    use_500 = protocol == "candidates500"
    if not any(r.candidates_500 if use_500 else r.candidates for r in records):
        which = "'500_candidates'" if use_500 else "'candidates'"
        raise ValueError(f"the data has no {which} lists; the {protocol} protocol needs a Personality-Captions "
                         "test file with them (use --protocol pool to rank the whole split instead)")
    return candidates_task(records, use_500=use_500)


def _backbone_identity(checkpoint: Checkpoint) -> str:
    """The feature-cache weights key: shared with training where the backbone's weights are known."""
    from transresnet.features import weights_identity

    cfg = checkpoint.config.model.image
    if cfg.freeze_backbone and (cfg.pretrained or (cfg.weights and Path(cfg.weights).is_file())):
        return weights_identity(cfg)  # a frozen backbone still holds exactly these weights
    digest = hashlib.sha256()
    for name, tensor in sorted(checkpoint.model.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "checkpoint-backbone:" + digest.hexdigest()[:32]


def image_features(checkpoint: Checkpoint, paths: Sequence[Path], *, feature_cache: str | None,
                   batch_size: int) -> np.ndarray:
    """Pooled backbone features (N, F): from the on-disk cache for frozen backbones, else computed live."""
    from transresnet.features import cached_features, compute_features
    from transresnet.images import ImagePreprocessor

    model, cfg = checkpoint.model, checkpoint.config.model.image
    started = time.perf_counter()
    if cfg.freeze_backbone:
        root = feature_cache or checkpoint.config.data.feature_cache
        features = cached_features(model.backbone, cfg, paths, root=root, weights=_backbone_identity(checkpoint),
                                   views=1, batch_size=min(batch_size, 64), device=model.device)[:, 0]
    else:
        features = compute_features(model.backbone, ImagePreprocessor(cfg), paths, batch_size=min(batch_size, 64),
                                    device=model.device)
    logger.info("image features of %d images in %.1fs", len(paths), time.perf_counter() - started)
    return np.asarray(features, dtype=np.float32)


def trait_slots(checkpoint: Checkpoint, traits: Sequence[str | None], mode: str, seed: int) -> list[int]:
    """Trait slot per query: as given, permuted across queries, or slot 0 ("no personality") for all."""
    model = checkpoint.model
    if model.personality is None or mode == "none":
        return [0] * len(traits)
    slots = model.traits.lookup_many(traits)  # an unknown trait is an error naming the closest ones
    if mode == "shuffled":
        slots = [int(s) for s in np.random.default_rng(seed).permutation(slots)]
    return slots


def query_vectors(checkpoint: Checkpoint, features: np.ndarray, slots: Sequence[int], batch_size: int) -> np.ndarray:
    from index.encode import encode_queries

    out = [encode_queries(checkpoint.model, slots[i:i + batch_size],
                          features=torch.from_numpy(features[i:i + batch_size]))
           for i in range(0, len(slots), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, checkpoint.model.embed_dim), np.float32)


# ------------------------------------------------------------------------------------------- ranks


def ranks_from_search(scores: np.ndarray, ids: np.ndarray, gold: Sequence[np.ndarray]) -> np.ndarray:
    """1-based rank of the best gold among each query's returned results (pessimistic ties).

    ``ids`` (Q, k) with -1 for empty slots; a query none of whose golds was returned gets rank k + 1.
    """
    k = ids.shape[1]
    ranks = np.empty(len(ids), dtype=np.int64)
    for q, (row_scores, row_ids) in enumerate(zip(scores, ids, strict=True)):
        valid = row_ids >= 0
        is_gold = np.isin(row_ids, gold[q]) & valid
        if not is_gold.any():
            ranks[q] = k + 1
            continue
        best = row_scores[is_gold].max()
        ranks[q] = 1 + int(((row_scores >= best) & valid & ~is_gold).sum())
    return ranks


def summarize(ranks: np.ndarray, *, curve_k: int = CURVE_K, searched_k: int | None = None) -> tuple[dict, list]:
    """Recall@1/5/10, ranks and the recall@k curve; a median above ``searched_k`` is only a lower bound."""
    metrics = summarize_ranks(ranks)
    curve = [float((ranks <= k).mean() * 100.0) for k in range(1, curve_k + 1)]
    if searched_k is not None and metrics["median_rank"] > searched_k:
        metrics["median_rank_censored"] = True
    return metrics, curve


def transpose_gold(gold: Sequence[np.ndarray], n_texts: int) -> list[np.ndarray]:
    """Per caption: the queries it is a gold caption of (the caption->image golds)."""
    owners: list[list[int]] = [[] for _ in range(n_texts)]
    for q, ids in enumerate(gold):
        for t in ids:
            owners[int(t)].append(q)
    return [np.asarray(o, dtype=np.int64) for o in owners]


def exact_ranks(database: np.ndarray, queries: np.ndarray, gold: Sequence[np.ndarray]) -> np.ndarray:
    """Full exact ranking through FAISS brute force (``index.faiss_index.exact_search``)."""
    import faiss

    from index import faiss_index as fx

    n = len(database)
    if fx.gpu_count() and n > fx.GPU_MAX_K:  # GPU kernels return at most GPU_MAX_K results
        flat = faiss.IndexFlatIP(database.shape[1])
        flat.add(np.ascontiguousarray(database, dtype=np.float32))
        scores, ids = flat.search(np.ascontiguousarray(queries, dtype=np.float32), n)
    else:
        scores, ids = fx.exact_search(database, queries, n)
    return ranks_from_search(scores, ids, gold)


# --------------------------------------------------------------------------------------- protocols


def _row(direction: str, search: str, ranks: np.ndarray, searched_k: int | None = None) -> Row:
    metrics, curve = summarize(ranks, searched_k=searched_k)
    not_returned = int((ranks > searched_k).sum()) if searched_k is not None else 0
    return Row(direction, search, metrics, curve, not_returned, searched_k)


def _mean_row(rows: Sequence[Row], search: str) -> Row:
    metrics = {key: float(np.mean([r.metrics[key] for r in rows])) for key in ("R@1", "R@5", "R@10")}
    curve = [float(v) for v in np.mean([r.curve for r in rows], axis=0)]
    return Row(MEAN, search, metrics, curve)


def eval_candidates(task: RankingTask, queries: np.ndarray, texts: np.ndarray) -> list[Row]:
    """Each query against its own candidates, exactly; no index is involved (lists of 100 or 500)."""
    ranks = rank_task(task, torch.from_numpy(queries), torch.from_numpy(texts))
    size = int(np.median([len(c) for c in task.candidates or []]))
    return [_row(I2C, f"exact, {size} candidates each", ranks)]


@dataclass
class _CaptionSide:
    """The caption pool of the pool protocol, as an index/ caption index and exact vectors."""

    index: Any  # index.search.CaptionIndex
    exact_vectors: np.ndarray  # float32 vectors of the same captions, row i = index row i
    gold: list[np.ndarray]  # per query: index rows of its gold captions
    label: str
    info: dict[str, Any]


def _caption_table(texts: Sequence[str]):
    from index.captions import CaptionTable

    return CaptionTable(captions=list(texts), ids=[str(i) for i in range(len(texts))], source="eval split",
                        format="eval", rows_read=len(texts))


def _search_label(manifest: dict[str, Any]) -> str:
    params = manifest["index"].get("search_params") or {}
    detail = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return manifest["index"]["type"] + (f" ({detail})" if detail else "")


def built_caption_side(checkpoint: Checkpoint, task: RankingTask, text_vectors: np.ndarray, options: EvalOptions,
                       root: Path) -> _CaptionSide:
    """Publish the split's captions as an ``index/`` version of ``options.index_type`` and load it back."""
    from index.build import BuildOptions, checkpoint_info, write_version
    from index.search import load_index

    build = BuildOptions(index_type=options.index_type, keep=1, precision=options.precision,
                         recall_target=options.recall_target, seed=options.seed)
    started = time.perf_counter()
    write_version(root, vectors=text_vectors, table=_caption_table(task.texts),
                  checkpoint_info=checkpoint_info(checkpoint), options=build)
    caption_index = load_index(root, checkpoint=checkpoint)
    info = {"source": "built for this evaluation", "path": str(caption_index.path),
            "build_seconds": round(time.perf_counter() - started, 3), **_index_info(caption_index.manifest)}
    return _CaptionSide(caption_index, text_vectors, list(task.gold), _search_label(caption_index.manifest), info)


def _index_info(manifest: dict[str, Any]) -> dict[str, Any]:
    index = manifest["index"]
    return {"type": index["type"], "factory": index["factory"], "search_params": index.get("search_params"),
            "tuning": {k: index.get("tuning", {}).get(k) for k in ("recall", "target", "k", "reached", "queries")},
            "count": manifest["count"], "version": manifest.get("version")}


def prebuilt_caption_side(checkpoint: Checkpoint, task: RankingTask, options: EvalOptions) -> _CaptionSide:
    """A published index: its captions are the pool (split captions plus any others, as distractors)."""
    from index.captions import dedup_key
    from index.encode import encode_captions
    from index.search import load_index
    from index.store import CAPTION, CAPTIONS_FILE, read_captions_table

    assert options.index is not None
    caption_index = load_index(options.index, checkpoint=checkpoint)
    captions = read_captions_table(caption_index.path / CAPTIONS_FILE).column(CAPTION).to_pylist()
    rows = {}
    for row, text in enumerate(captions):
        rows.setdefault(dedup_key(text), row)
    missing = [t for t in task.texts if dedup_key(t) not in rows]
    if missing:
        raise ValueError(f"index {caption_index.path} lacks {len(missing)} of the split's {len(task.texts)} captions "
                         f"(e.g. {missing[0]!r}); build one that holds them: transresnet index build "
                         f"--checkpoint {checkpoint.path} --captions {options.data} --out INDEX_ROOT")
    text_row = np.array([rows[dedup_key(t)] for t in task.texts], dtype=np.int64)
    gold = [np.unique(text_row[g]) for g in task.gold]
    logger.info("encoding the index's %d captions for the exact reference", len(captions))
    exact = encode_captions(checkpoint.model, captions, batch_size=options.batch_size, precision="float32")
    info = {"source": "prebuilt", "path": str(caption_index.path), **_index_info(caption_index.manifest)}
    return _CaptionSide(caption_index, exact, gold, _search_label(caption_index.manifest) + ", prebuilt", info)


def _image_side_index(vectors: np.ndarray, index_type: str, options: EvalOptions) -> tuple[Any, str, dict]:
    """The caption->image database: query vectors in an index of the same type (same build and tuning code)."""
    from index import faiss_index as fx
    from index.build import BuildOptions, build_and_tune

    spec = fx.resolve_spec(fx.IndexSpec(type=index_type), len(vectors), vectors.shape[1])
    build = BuildOptions(index_type=index_type, recall_target=options.recall_target,
                         recall_k=min(10, max(1, len(vectors) - 1)), seed=options.seed)
    index, tuning, _ = build_and_tune(np.ascontiguousarray(vectors, dtype=np.float32), spec, build)
    index = fx.to_gpu(index) or index
    params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in tuning.params.items())
    label = index_type + (f" ({params})" if params else "")
    return index, label, {"type": index_type, "factory": spec.factory(vectors.shape[1]), "search_params": tuning.params,
                          "tuning": {"recall": tuning.recall, "target": tuning.target, "k": tuning.k,
                                     "reached": tuning.reached}, "count": len(vectors)}


def eval_pool(checkpoint: Checkpoint, task: RankingTask, queries: np.ndarray, text_vectors: np.ndarray,
              options: EvalOptions, work_dir: Path) -> tuple[list[Row], dict[str, Any]]:
    """Exact and index search, both directions; returns the rows and what was searched."""
    from index import faiss_index as fx

    side = (prebuilt_caption_side(checkpoint, task, options) if options.index is not None
            else built_caption_side(checkpoint, task, text_vectors, options, work_dir / "caption-index"))
    timings: dict[str, float] = {}

    started = time.perf_counter()
    exact_i2c = _row(I2C, "exact", exact_ranks(side.exact_vectors, queries, side.gold))
    text_gold = transpose_gold(task.gold, len(task.texts))
    exact_c2i = _row(C2I, "exact", exact_ranks(queries, text_vectors, text_gold))
    timings["exact_search_s"] = time.perf_counter() - started

    k_text = min(CURVE_K, len(side.index))
    if side.index.on_gpu:
        k_text = min(k_text, fx.GPU_MAX_K)
    started = time.perf_counter()
    scores, ids = side.index.search_ids(queries, k_text)
    timings["index_search_s"] = time.perf_counter() - started
    timings["index_queries_per_s"] = len(queries) / max(timings["index_search_s"], 1e-9)
    approx_i2c = _row(I2C, side.label, ranks_from_search(scores, ids, side.gold), searched_k=k_text)

    image_index, image_label, image_info = _image_side_index(queries, side.info["type"], options)
    k_image = min(CURVE_K, len(queries))
    scores, ids = image_index.search(np.ascontiguousarray(text_vectors, dtype=np.float32), k_image)
    approx_c2i = _row(C2I, image_label, ranks_from_search(scores, ids, text_gold), searched_k=k_image)

    rows = [exact_i2c, exact_c2i, _mean_row([exact_i2c, exact_c2i], "exact"),
            approx_i2c, approx_c2i, _mean_row([approx_i2c, approx_c2i], side.info["type"])]
    searched = {"caption_index": side.info, "image_index": image_info,
                "searched_k": {I2C: k_text, C2I: k_image}, "seconds": {k: round(v, 4) for k, v in timings.items()}}
    return rows, searched


def recall_lost(rows: Sequence[Row]) -> dict[str, dict[str, float]]:
    """Per direction: exact recall minus index recall, in points."""
    exact = {r.direction: r for r in rows if r.search == "exact"}
    lost = {}
    for row in rows:
        if row.search != "exact" and row.direction in exact:
            lost[row.direction] = {k: round(exact[row.direction].metrics[k] - row.metrics[k], 4)
                                   for k in ("R@1", "R@5", "R@10")}
    return lost


# --------------------------------------------------------------------------------------------- run


def _file_sha256(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def run_eval(options: EvalOptions) -> dict[str, Any]:
    """Evaluate a checkpoint; writes eval.json, eval.md and recall_at_k.png to ``options.out`` if set."""
    from index.encode import encode_captions

    options.validate()
    total_start = time.perf_counter()
    checkpoint = load_checkpoint(options.checkpoint, device=resolve_device(options.device))
    records = load_records(options)
    task = build_task(records, options.protocol)
    images = list(dict.fromkeys(task.query_images))
    logger.info("%s protocol: %d queries over %d images, %d distinct captions", options.protocol, len(task),
                len(images), len(task.texts))
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    features = image_features(checkpoint, images, feature_cache=options.feature_cache, batch_size=options.batch_size)
    seconds["image_features_s"] = time.perf_counter() - started
    row_of = {p: i for i, p in enumerate(images)}
    started = time.perf_counter()
    slots = trait_slots(checkpoint, task.query_traits, options.traits, options.seed)
    queries = query_vectors(checkpoint, features[[row_of[p] for p in task.query_images]], slots, options.batch_size)
    seconds["query_encoding_s"] = time.perf_counter() - started
    started = time.perf_counter()
    text_vectors = encode_captions(checkpoint.model, task.texts, batch_size=options.batch_size,
                                   precision=options.precision)
    seconds["caption_encoding_s"] = time.perf_counter() - started
    seconds["captions_per_s"] = len(task.texts) / max(seconds["caption_encoding_s"], 1e-9)

    searched: dict[str, Any] = {}
    if options.protocol == "pool":
        if options.out is not None:
            rows, searched = eval_pool(checkpoint, task, queries, text_vectors, options, Path(options.out))
        else:
            with tempfile.TemporaryDirectory(prefix="transresnet-eval-") as tmp:
                rows, searched = eval_pool(checkpoint, task, queries, text_vectors, options, Path(tmp))
    else:
        started = time.perf_counter()
        rows = eval_candidates(task, queries, text_vectors)
        seconds["exact_search_s"] = time.perf_counter() - started
    seconds.update(searched.pop("seconds", {}))
    seconds["total_s"] = time.perf_counter() - total_start

    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "protocol": options.protocol,
        "traits": options.traits,
        "checkpoint": {"path": str(Path(options.checkpoint).resolve()), "fingerprint": checkpoint.fingerprint,
                       "name": checkpoint.config.name, "embed_dim": checkpoint.model.embed_dim,
                       "scoring": checkpoint.config.model.scoring},
        "data": {"path": str(Path(options.data).resolve()), "sha256": _file_sha256(Path(options.data)),
                 "split": options.split, "records": len(records), "images": len(images), "queries": len(task),
                 "captions": len(task.texts)},
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "host": {"platform": platform.platform(), "device": str(checkpoint.model.device),
                 "torch_threads": torch.get_num_threads()},
        "search": searched,
        "results": [asdict(r) for r in rows],
        "recall_lost": recall_lost(rows),
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
    }
    if options.out is not None:
        write_report(report, Path(options.out))
    return report


# ------------------------------------------------------------------------------------------ output


def _fmt_rank(metrics: dict[str, Any], key: str) -> str:
    if key not in metrics:
        return "-"
    value = metrics[key]
    text = f"{value:g}" if float(value).is_integer() else f"{value:.1f}"
    return f">{text}" if key == "median_rank" and metrics.get("median_rank_censored") else text


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["direction", "search", "R@1", "R@5", "R@10", "median rank", "queries"]
    rows = []
    for r in report["results"]:
        m = r["metrics"]
        rows.append([r["direction"], r["search"], f"{m['R@1']:.1f}", f"{m['R@5']:.1f}", f"{m['R@10']:.1f}",
                     _fmt_rank(m, "median_rank"), str(m.get("queries", "-"))])
    return header, rows


def format_text_table(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()  # noqa: E731
    out = [_title(report), "", line(header), line(["-" * w for w in widths]), *map(line, rows)]
    out += [f"recall the index loses against exact search ({d}): " + ", ".join(f"{k} {v:.1f}" for k, v in lost.items())
            + " points" for d, lost in report["recall_lost"].items()]
    return "\n".join(out)


def _title(report: dict[str, Any]) -> str:
    data = report["data"]
    split = f" split {data['split']}" if data["split"] else ""
    return (f"{report['protocol']} protocol on {Path(data['path']).name}{split}: {data['queries']} queries, "
            f"{data['captions']} captions; checkpoint {report['checkpoint']['name']} "
            f"({report['checkpoint']['fingerprint'][:12]}), traits {report['traits']}")


def format_markdown(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    lines = [f"# Evaluation: {_title(report)}", "",
             f"- date: {report['date']}",
             f"- checkpoint: `{report['checkpoint']['path']}` "
             f"(text fingerprint `{report['checkpoint']['fingerprint']}`)",
             f"- data: `{report['data']['path']}` (sha256 `{(report['data']['sha256'] or '')[:16]}`), split "
             f"{report['data']['split'] or '(whole file)'}",
             f"- protocol: {report['protocol']}, traits {report['traits']}", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for direction, lost in report["recall_lost"].items():
        lines.append("")
        lines.append(f"Recall the index loses against exact search ({direction}): " +
                     ", ".join(f"{k} {v:.1f}" for k, v in lost.items()) + " points")
    lines += ["", f"![recall@k]({REPORT_FILES['plot']})", ""]
    return "\n".join(lines)


def plot_curves(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["results"]:
        if r["direction"] == MEAN or not r["curve"]:
            continue
        ks = np.arange(1, len(r["curve"]) + 1)
        ax.plot(ks, r["curve"], label=f"{r['direction']}, {r['search']}",
                linestyle="-" if r["search"].startswith("exact") else "--")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(1, CURVE_K)
    ax.grid(alpha=0.3)
    ax.set_title("\n".join(textwrap.wrap(_title(report), 100)), fontsize=8)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in REPORT_FILES.items()}
    paths["json"].write_text(json.dumps(report, indent=1))
    paths["markdown"].write_text(format_markdown(report))
    plot_curves(report, paths["plot"])
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
