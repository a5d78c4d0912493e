"""Recall of a checkpoint on a test split: the protocols, exact ranks, and the report (table, JSON,
markdown, plot). Training's per-epoch validation and ``transresnet eval`` both score through
:func:`task_metrics` / :func:`exact_rows`.

Protocols:

- ``candidates`` / ``candidates500`` (Personality-Captions, ParlAI): each example is ranked against its own
  candidate list (100 with one gold, or 500 with five golds, ParlAI's ``--num-test-labels 5``); a hit@k is
  any gold within the top k; the median rank is that of the best-ranked gold.
- ``pool`` (COCO / Flickr30k): every distinct (image, personality) query ranks every distinct caption of
  the split (image->caption, any of its golds counts) and every caption ranks all queries (caption->image).

Vectors come from :mod:`transresnet.encode` (the service's encoding path). Ranks are pessimistic about
ties (a wrong caption scoring exactly like the best gold ranks above it), as in :mod:`transresnet.metrics`.
Searching the pool through an approximate caption index, side by side with the exact rows computed
here, is the index layer's part (:mod:`transresnet.index.evaluate`): an approximate search returns at
most ``k`` results, and a gold it does not return counts as rank ``k + 1`` (:func:`ranks_from_search`).
"""

from __future__ import annotations

import json
import logging
import platform
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transresnet.checkpoint import Checkpoint, load_checkpoint, state_dict_digest
from transresnet.data import CaptionRecord, load_dataset
from transresnet.devices import resolve_device
from transresnet.encode import encode_captions, encode_queries
from transresnet.files import sha256_file
from transresnet.image_runtime import ImageRunner
from transresnet.metrics import summarize_ranks
from transresnet.options import EvalOptions
from transresnet.retrieval import RankingTask, candidates_task, pool_ranks, pool_task, rank_task
from transresnet.runtime import utc_timestamp
from transresnet.tables import format_table

logger = logging.getLogger(__name__)

CURVE_K = 50
"""Recall@k is reported and plotted for k = 1..CURVE_K; approximate searches return this many results."""
REPORT_FILES = {"json": "eval.json", "markdown": "eval.md", "plot": "recall_at_k.png"}
I2C, C2I, MEAN = "image->caption", "caption->image", "mean"


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
    if cfg.freeze_backbone and not cfg.train_tail and (cfg.pretrained or (cfg.weights and Path(cfg.weights).is_file())):
        return weights_identity(cfg)  # a frozen backbone still holds exactly these weights
    return "checkpoint-backbone:" + state_dict_digest(checkpoint.model.backbone).hexdigest()[:32]


def image_encoder(checkpoint: Checkpoint, precision: str, paths: Sequence[Path]) -> ImageRunner:
    """The checkpoint's image encoder in ``precision``, checked on a spread of the evaluated photos
    (they only set int8's activation ranges and test every mode against float32; no labels are read)."""
    from transresnet.image_runtime import calibration_from_files, prepare_image_encoder

    calibration = None if precision == "float32" else calibration_from_files(paths, checkpoint.config.model.image)
    return prepare_image_encoder(checkpoint.model, precision, calibration=calibration,
                                 checkpoint_dir=Path(checkpoint.path))


def image_features(checkpoint: Checkpoint, paths: Sequence[Path], *, feature_cache: str | Path | None,
                   batch_size: int, encoder: ImageRunner | None = None) -> np.ndarray:
    """Pooled backbone features (N, F): from the on-disk cache for frozen backbones, else computed live,
    averaged over the checkpoint config's test-time views (``model.image.tta``, as the service does).

    ``encoder``: the image runtime to compute them with (default: the float32 backbone); features of
    another runtime are cached apart from float32's.
    """
    from transresnet.features import cached_features, compute_features
    from transresnet.images import ImagePreprocessor

    model, cfg = checkpoint.model, checkpoint.config.model.image
    backbone = encoder if encoder is not None else model.backbone
    started = time.perf_counter()
    if cfg.freeze_backbone:
        root = feature_cache or checkpoint.config.data.feature_cache
        features = cached_features(backbone, cfg, paths, root=root, weights=_backbone_identity(checkpoint),
                                   views=1, batch_size=min(batch_size, 64), device=model.device, tta=cfg.tta)[:, 0]
    else:
        features = compute_features(backbone, ImagePreprocessor(cfg), paths, batch_size=min(batch_size, 64),
                                    device=model.device, tta=cfg.tta)
    logger.info("image features of %d images (test-time views: %s) in %.1fs", len(paths), cfg.tta,
                time.perf_counter() - started)
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
    """Full exact ranking of ``database`` rows for every query (the same scoring training validates with)."""
    return pool_ranks(queries, database, gold)


# --------------------------------------------------------------------------------------- protocols


def make_row(direction: str, search: str, ranks: np.ndarray, searched_k: int | None = None) -> Row:
    metrics, curve = summarize(ranks, searched_k=searched_k)
    not_returned = int((ranks > searched_k).sum()) if searched_k is not None else 0
    return Row(direction, search, metrics, curve, not_returned, searched_k)


def mean_row(rows: Sequence[Row], search: str) -> Row:
    metrics = {key: float(np.mean([r.metrics[key] for r in rows])) for key in ("R@1", "R@5", "R@10")}
    curve = [float(v) for v in np.mean([r.curve for r in rows], axis=0)]
    return Row(MEAN, search, metrics, curve)


def eval_candidates(task: RankingTask, queries: np.ndarray, texts: np.ndarray) -> list[Row]:
    """Each query against its own candidates, exactly; no index is involved (lists of 100 or 500)."""
    ranks = rank_task(task, torch.from_numpy(queries), torch.from_numpy(texts))
    size = int(np.median([len(c) for c in task.candidates or []]))
    return [make_row(I2C, f"exact, {size} candidates each", ranks)]


def task_metrics(task: RankingTask, queries: torch.Tensor | np.ndarray, texts: torch.Tensor | np.ndarray
                 ) -> dict[str, float]:
    """R@1/5/10, median and mean rank of a task, scored exactly (training's validation uses this too)."""
    return summarize_ranks(rank_task(task, queries, texts))


def exact_rows(task: RankingTask, queries: np.ndarray, texts: np.ndarray,
               captions: tuple[np.ndarray, Sequence[np.ndarray]] | None = None) -> list[Row]:
    """The pool protocol searched exactly: image->caption, caption->image and their mean.

    ``captions``: (vectors, gold rows per query) of a larger caption pool searched image->caption (a
    prebuilt index's captions, the split's among them); default: the split's own captions.
    """
    database, gold = captions if captions is not None else (texts, task.gold)
    i2c = make_row(I2C, "exact", exact_ranks(database, queries, gold))
    c2i = make_row(C2I, "exact", exact_ranks(queries, texts, transpose_gold(task.gold, len(task.texts))))
    return [i2c, c2i, mean_row([i2c, c2i], "exact")]


def recall_lost(rows: Sequence[Row]) -> dict[str, dict[str, float]]:
    """Per direction: exact recall minus index recall, in points."""
    exact = {r.direction: r for r in rows if r.search == "exact"}
    lost = {}
    for row in rows:
        if row.search != "exact" and row.direction in exact:
            lost[row.direction] = {k: round(exact[row.direction].metrics[k] - row.metrics[k], 4)
                                   for k in ("R@1", "R@5", "R@10")}
    return lost


# ------------------------------------------------------------------------------------------ inputs


@dataclass
class EvalInputs:
    """What every protocol scores: the task and its query and caption vectors."""

    checkpoint: Checkpoint
    records: list[CaptionRecord]
    task: RankingTask
    queries: np.ndarray
    texts: np.ndarray
    images: int
    seconds: dict[str, float] = field(default_factory=dict)
    image_encoder: dict[str, Any] = field(default_factory=dict)
    """The image runtime used and its check (:class:`transresnet.image_runtime.ImageEncoderReport`)."""


def prepare(options: EvalOptions) -> EvalInputs:
    """Load the checkpoint and the split, and encode its queries and captions."""
    checkpoint = load_checkpoint(options.checkpoint, device=resolve_device(options.device))
    if options.tta is not None:  # the model reads the same config object: its encode_image follows too
        checkpoint.config.model.image.tta = options.tta
    records = load_records(options)
    task = build_task(records, options.protocol)
    images = list(dict.fromkeys(task.query_images))
    logger.info("%s protocol: %d queries over %d images, %d distinct captions", options.protocol, len(task),
                len(images), len(task.texts))
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    encoder = image_encoder(checkpoint, options.image_precision, images)
    seconds["image_encoder_prepare_s"] = time.perf_counter() - started
    started = time.perf_counter()
    features = image_features(checkpoint, images, feature_cache=options.feature_cache, batch_size=options.batch_size,
                              encoder=encoder)
    seconds["image_features_s"] = time.perf_counter() - started
    row_of = {p: i for i, p in enumerate(images)}
    started = time.perf_counter()
    slots = trait_slots(checkpoint, task.query_traits, options.traits, options.seed)
    queries = query_vectors(checkpoint, features[[row_of[p] for p in task.query_images]], slots, options.batch_size)
    seconds["query_encoding_s"] = time.perf_counter() - started
    started = time.perf_counter()
    texts = encode_captions(checkpoint.model, task.texts, batch_size=options.batch_size, precision=options.precision)
    seconds["caption_encoding_s"] = time.perf_counter() - started
    seconds["captions_per_s"] = len(task.texts) / max(seconds["caption_encoding_s"], 1e-9)
    return EvalInputs(checkpoint, records, task, queries, texts, len(images), seconds,
                      image_encoder={**encoder.report.to_dict(), "tta": checkpoint.config.model.image.tta})


def _file_sha256(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def build_report(options: EvalOptions, inputs: EvalInputs, rows: Sequence[Row], search: dict[str, Any],
                 seconds: dict[str, float]) -> dict[str, Any]:
    """The JSON report of one evaluation (what ``write_report`` renders)."""
    checkpoint, task = inputs.checkpoint, inputs.task
    return {
        "date": utc_timestamp(),
        "protocol": options.protocol,
        "traits": options.traits,
        "checkpoint": {"path": str(Path(options.checkpoint).resolve()), "fingerprint": checkpoint.fingerprint,
                       "name": checkpoint.config.name, "embed_dim": checkpoint.model.embed_dim,
                       "scoring": checkpoint.config.model.scoring},
        "data": {"path": str(Path(options.data).resolve()), "sha256": _file_sha256(Path(options.data)),
                 "split": options.split, "records": len(inputs.records), "images": inputs.images,
                 "queries": len(task), "captions": len(task.texts)},
        "options": options.model_dump(mode="json"),
        "host": {"platform": platform.platform(), "device": str(checkpoint.model.device),
                 "torch_threads": torch.get_num_threads()},
        "search": search,
        "image_encoder": inputs.image_encoder,
        "results": [asdict(r) for r in rows],
        "recall_lost": recall_lost(rows),
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
    }


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
    out = [_title(report), _image_line(report), "", format_table(header, rows)]
    out += [f"recall the index loses against exact search ({d}): " + ", ".join(f"{k} {v:.1f}" for k, v in lost.items())
            + " points" for d, lost in report["recall_lost"].items()]
    return "\n".join(out)


def _title(report: dict[str, Any]) -> str:
    data = report["data"]
    split = f" split {data['split']}" if data["split"] else ""
    return (f"{report['protocol']} protocol on {Path(data['path']).name}{split}: {data['queries']} queries, "
            f"{data['captions']} captions; checkpoint {report['checkpoint']['name']} "
            f"({report['checkpoint']['fingerprint'][:12]}), traits {report['traits']}")


def _image_line(report: dict[str, Any]) -> str:
    encoder = report.get("image_encoder") or {}
    chosen, requested = encoder.get("chosen", "float32"), encoder.get("requested", "float32")
    line = f"image encoder: {chosen}" + (f" ({requested}: {encoder.get('reason', '')})" if requested != chosen else "")
    return line + (f", test-time views: {encoder['tta']}" if encoder.get("tta", "none") != "none" else "")


def format_markdown(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    lines = [f"# Evaluation: {_title(report)}", "",
             f"- date: {report['date']}",
             f"- checkpoint: `{report['checkpoint']['path']}` "
             f"(text fingerprint `{report['checkpoint']['fingerprint']}`)",
             f"- data: `{report['data']['path']}` (sha256 `{(report['data']['sha256'] or '')[:16]}`), split "
             f"{report['data']['split'] or '(whole file)'}",
             f"- protocol: {report['protocol']}, traits {report['traits']}",
             f"- {_image_line(report)}", "",
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
