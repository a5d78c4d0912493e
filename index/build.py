"""`transresnet index build`: captions -> vectors (the checkpoint's encoder) -> tuned FAISS index -> a
published, versioned index directory (see ``index.store`` for the layout)."""

from __future__ import annotations

import logging
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from transresnet.runtime import utc_timestamp

from . import faiss_index as fx
from . import store
from .captions import CaptionTable, Source, read_captions
from .options import BuildOptions
from .verify import SHOWN_IDS, describe_rows, nonfinite_rows

if TYPE_CHECKING:
    from transresnet.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

TOOL = "transresnet-index"


@dataclass(frozen=True)
class Published:
    """A published index version: its directory and the manifest written there."""

    path: Path
    manifest: dict[str, Any]

    def summary(self) -> str:
        tuning = self.manifest["index"]["tuning"]
        recall = "exact" if tuning["target"] is None else f"recall@{tuning['k']} {tuning['recall']:.3f}"
        return (f"published {self.path} ({self.manifest['count']} captions, {self.manifest['index']['factory']}, "
                f"{recall}, {self.manifest['build']['seconds']['total_s']:.1f}s)")


def tool_version() -> str:
    try:
        return metadata.version("transresnet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class TuningQueries:
    """The query vectors an approximate index is tuned with, and the manifest's words for where they came from."""

    vectors: np.ndarray
    source: str


def tuning_queries(options: BuildOptions, dim: int, checkpoint: Checkpoint | None = None,
                   spec: fx.IndexSpec | None = None) -> TuningQueries | None:
    """What tunes the index: ``options.queries`` when given, else (for an approximate ``spec`` and a
    ``checkpoint`` at hand) the queries of its held-out photos, else None: held-out caption vectors.

    Photo queries are what the service searches with, and they are harder than caption vectors: on the Flickr8k
    voices checkpoint, an HNSW index tuned on caption vectors to recall@10 0.993 found 0.83 of the exact
    neighbours of unseen photos' queries (docs/results.md).
    """
    if options.queries:
        return TuningQueries(load_queries(options.queries, dim), f"query vectors from {options.queries}")
    if checkpoint is None or spec is None or spec.type == "flat" or options.tune_photos == 0:
        return None
    return photo_queries(checkpoint, options.tune_photos, options.tune_queries, options.seed)


def photo_queries(checkpoint: Checkpoint, photos: int, limit: int, seed: int) -> TuningQueries | None:
    """Up to ``limit`` queries of up to ``photos`` held-out photos of the checkpoint's training data (each photo
    with every personality slot, none included); None, said in the log, where no such photo is on this
    machine."""
    import torch

    from transresnet.encode import encode_photo_queries
    from transresnet.image_runtime import calibration_from_files, held_out_photos

    config = checkpoint.config
    pixels = calibration_from_files(held_out_photos(config.data), config.model.image, photos)
    if pixels is None:
        logger.info("no held-out photos of the checkpoint's training data on this machine; tuning with held-out "
                    "caption vectors (photo queries usually need a wider search for the same recall)")
        return None
    slots = list(range(len(checkpoint.traits.names) + 1)) if config.model.personality.enabled else [0]
    vectors = np.concatenate([np.concatenate(encode_photo_queries(checkpoint.model, chunk, [slots] * len(chunk)))
                              for chunk in torch.split(pixels, 32)])
    if len(vectors) > limit:
        vectors = vectors[np.sort(np.random.default_rng(seed + 2).choice(len(vectors), size=limit, replace=False))]
    voices = f" x {len(slots)} personalities" if len(slots) > 1 else ""
    return TuningQueries(np.ascontiguousarray(vectors, dtype=np.float32),
                         f"{len(vectors)} queries of {len(pixels)} held-out photos{voices}")


def load_queries(path: str | Path, dim: int) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"query vectors file {path} not found (an .npy array of shape (n, {dim}))")
    try:
        queries = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path} is not a plain .npy array ({err}); save with numpy.save") from None
    if queries.ndim != 2 or queries.shape[1] != dim or len(queries) == 0:
        raise ValueError(f"{path} holds an array of shape {queries.shape}; the index needs query vectors of "
                         f"shape (n, {dim}) made with this checkpoint's encode_query")
    return np.ascontiguousarray(queries, dtype=np.float32)


@dataclass
class Tuning:
    """How the search parameters were chosen (recorded in the manifest)."""

    params: dict[str, float]
    recall: float | None
    target: float | None
    k: int | None
    reached: bool | None
    queries: str
    n_queries: int
    seconds: float


def held_out_rows(n: int, count: int, seed: int) -> np.ndarray:
    """Caption rows used as tuning queries (kept out of the IVF/PQ training sample)."""
    count = min(count, max(1, n // 10))
    return np.sort(np.random.default_rng(seed + 1).choice(n, size=count, replace=False))


Builder = Callable[..., tuple[faiss.Index, dict[str, float]]]
"""Trains and fills an index: ``builder(vectors, spec, train_ids=..., seed=...) -> (index, timings)``, like
:func:`faiss_index.build_faiss_index` (the default); the ray engine passes one that adds in parallel."""


def choose_spec(options: BuildOptions, n: int, dim: int) -> fx.IndexSpec:
    """The index type and its size-dependent parameters for ``n`` vectors: the one decision of both engines."""
    budget = fx.parse_bytes(options.memory_budget) if options.memory_budget else None
    requested = fx.IndexSpec(type=options.index_type, nlist=options.nlist, pq_m=options.pq_m,
                             hnsw_m=options.hnsw_m, ef_construction=options.ef_construction, refine=options.refine)
    return fx.resolve_spec(requested, n, dim, budget)


def build_and_tune(vectors: np.ndarray, spec: fx.IndexSpec, options: BuildOptions, *,
                   builder: Builder | None = None, queries: TuningQueries | None = None
                   ) -> tuple[faiss.Index, Tuning, dict[str, float]]:
    """Build the index and tune its search parameters to the recall target (with ``queries``, else
    :func:`tuning_queries` without a checkpoint); returns a CPU index."""
    n, dim = vectors.shape
    queries = queries or tuning_queries(options, dim)
    held_out = None if queries is not None or spec.type == "flat" else held_out_rows(n, options.tune_queries,
                                                                                    options.seed)
    train_ids = None
    if held_out is not None and n > len(held_out):
        train_ids = np.setdiff1d(np.arange(n), held_out)  # tuning queries stay unseen by k-means/PQ
    index, timings = (builder or fx.build_faiss_index)(vectors, spec, train_ids=train_ids, seed=options.seed)
    tuning = tune_index(index, vectors, spec, options, held_out=held_out, queries=queries)
    timings["tune_s"] = tuning.seconds
    cpu_index = fx.to_cpu(index)
    fx.apply_params(cpu_index, tuning.params)  # persisted, so a plain faiss.read_index gets them too
    return cpu_index, tuning, timings


def tune_index(index: faiss.Index, vectors: np.ndarray, spec: fx.IndexSpec, options: BuildOptions, *,
               held_out: np.ndarray | None, queries: TuningQueries | None) -> Tuning:
    """Tune ``index`` to the recall target against exact search of ``vectors`` (row i = FAISS id i), with
    ``queries`` or else the ``held_out`` rows (each query's own row left out)."""
    n = len(vectors)
    started = time.perf_counter()
    if spec.type == "flat":
        tuning = Tuning({}, 1.0, None, None, None, "exact", 0, 0.0)
    else:
        k = max(1, min(options.recall_k, n - 1))
        if queries is not None:
            query_vectors, self_ids, source = queries.vectors, None, queries.source
        else:
            query_vectors, self_ids, source = vectors[held_out], held_out, "held-out caption vectors"
        _, truth = fx.exact_search(vectors, query_vectors, k + (self_ids is not None))
        truth = fx.drop_self(truth, self_ids, k)
        result = fx.tune_search(index, query_vectors, truth, k=k, target=options.recall_target, self_ids=self_ids)
        tuning = Tuning(result.params, result.recall, result.target, k, result.reached, source,
                        len(query_vectors), 0.0)
    tuning.seconds = time.perf_counter() - started
    return tuning


def _manifest(*, version: str, checkpoint_info: dict[str, Any], table: CaptionTable, spec: fx.IndexSpec,
              index: faiss.Index, tuning: Tuning, timings: dict[str, float], options: BuildOptions,
              encoding: dict[str, Any], engine: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format_version": store.FORMAT_VERSION,
        "version": version,
        "created": utc_timestamp(),
        "tool": TOOL,
        "tool_version": tool_version(),
        "faiss_version": faiss.__version__,
        "host": platform.node(),
        "checkpoint": checkpoint_info,
        "dim": int(index.d),
        "count": int(index.ntotal),
        "metric": "inner_product",
        "normalized": checkpoint_info.get("scoring") == "cosine",
        "scoring": checkpoint_info.get("scoring"),
        "index": {
            "type": spec.type,
            "factory": spec.factory(int(index.d)),
            "params": spec.to_dict(),
            "search_params": tuning.params,
            "memory_bytes": fx.index_memory_bytes(index),
            "tuning": asdict(tuning),
        },
        "encoding": encoding,
        "source": table.report(),
        "columns": ["row", "id", "caption", *table.metadata],
        "has_personality": table.personalities is not None,
        "finite_vectors": True,  # write_version refuses NaN/inf; loaders of PQ codes rely on this record
        "build": {"seconds": {k: round(v, 3) for k, v in timings.items()}, "options": options.model_dump(mode="json"),
                  "gpus": fx.gpu_count(), "engine": engine or {"name": options.engine}},
    }


def refuse_nonfinite(vectors: np.ndarray, table: CaptionTable) -> None:
    """Raise ValueError naming how many rows and which captions have NaN or infinite vectors."""
    bad = nonfinite_rows(vectors)
    if len(bad):
        ids = [table.ids[row] for row in bad[:SHOWN_IDS].tolist()]
        raise ValueError(f"{describe_rows(bad, ids, len(vectors))} have NaN or infinite caption vectors; no "
                         "index was written. The text encoder produced them: check the checkpoint's weights "
                         "(a diverged training run?) and the --precision used for encoding")


def write_version(root: Path, *, vectors: np.ndarray, table: CaptionTable, checkpoint_info: dict[str, Any],
                  options: BuildOptions, encoding: dict[str, Any] | None = None,
                  stages: dict[str, float] | None = None, engine: dict[str, Any] | None = None,
                  builder: Builder | None = None, checkpoint: Checkpoint | None = None) -> Published:
    """Build, tune and publish an index of ``vectors`` (row i = ``table`` row i) under ``root``.

    ``stages``: seconds of the steps before this one (read_s, encode_s), recorded beside train/add/tune/write;
    ``engine``: what encoded the vectors (the manifest's build.engine); ``builder``: see :data:`Builder`;
    ``checkpoint``: the encoder's, whose held-out photos' queries then tune an approximate index.
    """
    started = time.perf_counter()
    n, dim = vectors.shape
    if n != len(table):
        raise ValueError(f"{n} vectors for {len(table)} captions")
    refuse_nonfinite(vectors, table)
    spec = choose_spec(options, n, dim)
    queries = tuning_queries(options, dim, checkpoint, spec)
    index, tuning, timings = build_and_tune(vectors, spec, options, builder=builder, queries=queries)
    timings = {**(stages or {}), **timings}
    before = sum(stages.values()) if stages else (encoding or {}).get("seconds", 0.0)
    writing = time.perf_counter()

    def manifest_for(version: str) -> dict[str, Any]:
        timings["write_s"] = time.perf_counter() - writing  # index and captions files; the manifest is small
        timings["total_s"] = time.perf_counter() - started + before
        return _manifest(version=version, checkpoint_info=checkpoint_info, table=table, spec=spec, index=index,
                         tuning=tuning, timings=timings, options=options, encoding=encoding or {}, engine=engine)

    return publish_version(root, index, table, manifest_for, keep=options.keep)


def publish_version(root: Path, index: faiss.Index, table: CaptionTable,
                    manifest_for: Callable[[str], dict[str, Any]], *, keep: int) -> Published:
    """Write ``index`` (CPU, FAISS id i = ``table`` row i), the captions and ``manifest_for(version)`` plus the
    files' sizes and sha256 to a staging directory, publish it as the current version and prune to ``keep``."""
    version = store.new_version_name()
    staging = store.new_staging_dir(root, version)
    try:
        faiss.write_index(index, str(staging / store.INDEX_FILE))
        store.write_captions(staging / store.CAPTIONS_FILE, table)
        manifest = manifest_for(version)
        manifest["files"] = {name: store.file_entry(staging / name)
                             for name in (store.INDEX_FILE, store.CAPTIONS_FILE)}
        store.write_json(staging / store.MANIFEST_FILE, manifest)
        final = store.publish(staging, root, version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the previous version stays current
        raise
    store.prune(root, keep)
    return Published(final, manifest)


def checkpoint_info(checkpoint: Checkpoint) -> dict[str, Any]:
    model = checkpoint.model
    return {"path": str(Path(checkpoint.path).resolve()), "fingerprint": checkpoint.fingerprint,
            "embed_dim": model.embed_dim, "scoring": model.config.scoring,
            "text_encoder": model.text.identity()}


def build_index(checkpoint: Checkpoint, captions: Source | CaptionTable, out_root: str | Path,
                options: BuildOptions | None = None, *, progress: bool | None = None) -> Published:
    """Encode ``captions`` (a file, several, a folder of shards, or a table) with the checkpoint's text
    encoder and publish a new index version; ``options.engine == "ray"`` runs it on Ray
    (:func:`transresnet.index.distributed.build_index_ray`).

    Returns the published version (INDEX_ROOT/versions/<version>) and its manifest.
    """
    options = options or BuildOptions()
    if options.engine == "ray":
        from .distributed import build_index_ray

        return build_index_ray(checkpoint, captions, out_root, options, progress=progress)
    reading = time.perf_counter()
    table = captions if isinstance(captions, CaptionTable) else read_captions(captions)
    read_s = time.perf_counter() - reading
    vectors, encoding = encode_table(checkpoint, table, options, progress=progress)
    return write_version(Path(out_root), vectors=vectors, table=table, checkpoint_info=checkpoint_info(checkpoint),
                         options=options, encoding=encoding, stages={"read_s": read_s, "encode_s": encoding["seconds"]},
                         checkpoint=checkpoint)


def encode_table(checkpoint: Checkpoint, table: CaptionTable, options: BuildOptions, *,
                 progress: bool | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The table's caption vectors in this process (the core's one encoding path) and the manifest's record of
    how they were made: precision (``auto`` resolved on this model), device, batch size, time, rate."""
    from transresnet.encode import choose_precision, encode_captions

    model = checkpoint.model
    precision = choose_precision(model, table.captions, options.precision)
    started = time.perf_counter()
    vectors = encode_captions(model, table.captions, batch_size=options.batch_size, precision=precision,
                              progress=progress)
    seconds = time.perf_counter() - started
    logger.info("encoded %d captions in %.1fs (%.0f captions/s, %s, %s)", len(table), seconds,
                len(table) / max(seconds, 1e-9), precision, model.device)
    return vectors, {"precision": precision, "device": str(model.device), "batch_size": options.batch_size,
                     "seconds": round(seconds, 3), "encoded": len(table),
                     "captions_per_second": round(len(table) / max(seconds, 1e-9), 1)}
