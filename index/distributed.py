"""`transresnet index build --engine ray`: the same build, with reading, encoding and IVF adds on Ray.

Stages (each timed into the manifest's ``build.seconds``):

* **read**: a Ray Data dataset of the caption files, one read task per file (a folder of shards reads in
  parallel), each parsing with :func:`captions.read_rows`, the local engine's one parser. The rows come back
  to the driver in source order (caption, id and the other columns as JSON) and :func:`captions.collect`
  drops empties and duplicates there: the first occurrence of a duplicate wins across all files, which needs
  one ordered pass, and the result is exactly the local engine's table.
* **encode**: ``map_batches`` over a fixed pool of :class:`CaptionEncoder` actors, each loading the
  checkpoint once and calling :func:`transresnet.encode.encode_captions` (on a GPU when ``gpus_per_worker``
  gives it one). Vector shards come back with their row numbers and are written into one memory-mapped
  ``(n, D)`` float32 file at their rows; every row must arrive exactly once. A killed actor is restarted and
  its batch retried up to ``max_retries`` times; past that the build fails and nothing is published.
* **train / add / tune / write**: :func:`build.write_version`, so the index type, its tuning, the manifest,
  checksums and the atomic ``CURRENT`` switch are the local engine's. On a cluster of several nodes, IVF-Flat
  and IVF-PQ are trained on the driver on the same sample as the local engine, then the vectors are added in
  parallel Ray tasks (one contiguous row range each, on copies of the trained empty index) and merged in row
  order, which gives the same inverted lists as a sequential add. Flat, HNSW and refined IVF-PQ, and every
  type on a single node (where FAISS's threads already add in parallel), are added on the driver.

Ray is an optional extra (``pip install 'transresnet[distributed]'``); it is imported only here, inside the
functions that need it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from transresnet.files import remove_stale
from transresnet.progress import progress as progress_reporter

from . import faiss_index as fx
from .build import Published, checkpoint_info, write_version
from .captions import (
    CAPTION,
    ID,
    CaptionTable,
    Source,
    as_text_row,
    checked,
    collect,
    describe_source,
    read_rows,
    source_files,
)
from .options import BuildOptions

if TYPE_CHECKING:
    from transresnet.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'transresnet[distributed]' (Ray Data: ray[data])"
READ_BATCH_ROWS = 65_536
"""Rows per batch a read task sends back (bounded memory for large shard files)."""
ENCODE_CALLS_PER_BATCH = 8
"""Encoder batches per actor call: encode_captions sorts each call by length, so larger calls pad less."""
BLOCKS_PER_WORKER = 4
"""At least this many encode blocks per actor, so a slow actor does not hold the tail of the build."""
ADD_PART_ROWS = 1_000_000
"""At most this many vectors per parallel add task."""
VECTORS_PREFIX = ".vectors-"
"""The encoded vectors' scratch folder in INDEX_ROOT, ``.vectors-<random>@<host>@<pid>``."""


class RayBuildError(RuntimeError):
    """The Ray part of a build failed (a batch kept failing, rows went missing); nothing was published."""


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or ImportError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the ray engine needs the data library, not only the core
    except ImportError as err:
        raise ImportError(f"--engine ray needs Ray Data, which is not installed ({err}); {INSTALL_HINT}, "
                          "or build with --engine local") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Use the Ray instance this process already joined, else connect to ``address`` (None: start a local
    one on this machine) for the build and disconnect afterwards."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def quiet_ray_data() -> Iterator[None]:
    """Ray Data's per-dataset plans and progress lines only with -v; the build reports its own progress."""
    ray_logger = logging.getLogger("ray.data")
    before = ray_logger.level
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        ray_logger.setLevel(max(before, logging.WARNING))
    try:
        yield
    finally:
        ray_logger.setLevel(before)


@contextlib.contextmanager
def preserve_order(ray: Any) -> Iterator[None]:
    """Datasets created inside keep their input order (the read pass needs it for first-occurrence dedupe)."""
    context = ray.data.DataContext.get_current()
    before = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        yield
    finally:
        context.execution_options.preserve_order = before


# ------------------------------------------------------------------------------------------ read


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows as fixed text columns: caption, id, and the other columns as one JSON object in their source
    order (which :func:`captions.collect` keeps). A missing value travels as "": Ray turns an all-None
    column into NaN, and collect treats an empty caption or id exactly as a missing one."""
    captions, ids, extra = [], [], []
    for row in rows:
        text = as_text_row(row)
        captions.append(text.pop(CAPTION, None) or "")
        ids.append(text.pop(ID, None) or "")
        extra.append(json.dumps(text, ensure_ascii=False) if text else "")
    return {"caption": np.array(captions, dtype=object), "id": np.array(ids, dtype=object),
            "extra": np.array(extra, dtype=object)}


def _parse_files(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """A read task: the rows of each file, in order, in batches of at most READ_BATCH_ROWS."""
    for path in batch["path"]:
        rows: list[dict[str, Any]] = []
        for row in read_rows(Path(str(path))):
            rows.append(row)
            if len(rows) == READ_BATCH_ROWS:
                yield _columns(rows)
                rows = []
        if rows:
            yield _columns(rows)


def _rows(batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    """A read task's columns back as the rows :func:`captions.collect` takes."""
    for caption, row_id, extra in zip(batch["caption"], batch["id"], batch["extra"], strict=True):
        row = json.loads(extra) if extra else {}
        row[CAPTION], row[ID] = caption, row_id
        yield row


def read_table_ray(ray: Any, source: Source) -> CaptionTable:
    """The caption table of ``source``, parsed by Ray read tasks (one per file) and deduplicated in order."""
    files = source_files(source)
    for path in files:
        next(iter(read_rows(path)), None)  # a missing column or unreadable file fails here, in plain words
    label, fmt = describe_source(source, files)
    with preserve_order(ray):
        dataset = ray.data.from_items([{"path": str(p)} for p in files], override_num_blocks=len(files))
        rows = dataset.map_batches(_parse_files, batch_size=1, batch_format="numpy")
        parsed = (row for batch in rows.iter_batches(batch_size=None, batch_format="numpy") for row in _rows(batch))
        try:
            table = collect(parsed, source=label, fmt=fmt)
        except ray.exceptions.RayError as err:  # a read task's own error arrives wrapped
            raise _plain(err, "reading the captions") from err
    return checked(table)


def _root_cause(err: BaseException) -> BaseException:
    """The exception a Ray task raised, unwrapped from RayTaskError (``.cause``) layers."""
    seen = 0
    while getattr(err, "cause", None) is not None and seen < 10:
        err, seen = err.cause, seen + 1
    return err


def _plain(err: BaseException, stage: str) -> Exception:
    """A one-line error for a failed Ray stage: the task's own ValueError / OSError (a bad caption row, a
    missing file) keeps its type and message; anything else (a dead actor) becomes a RayBuildError."""
    cause = _root_cause(err)
    text = str(cause).strip()
    first = text.splitlines()[0] if text else type(cause).__name__  # Ray appends its retry advice below
    if isinstance(cause, (ValueError, OSError)):
        return type(cause)(f"{first} (in a Ray task; no index version was published)")
    return RayBuildError(f"{stage} on Ray failed ({type(cause).__name__}: {first}); no index version was "
                         "published")


# ---------------------------------------------------------------------------------------- encode


class CaptionEncoder:
    """A Ray Data actor: loads the checkpoint once, then encodes batches of (row, caption) with
    :func:`transresnet.encode.encode_captions`, the local engine's encoding function."""

    def __init__(self, checkpoint_path: str, *, device: str, precision: str, calibration: list[str],
                 batch_size: int, threads: int) -> None:
        import torch

        from transresnet.checkpoint import load_checkpoint
        from transresnet.encode import choose_precision
        from transresnet.runtime import apply_runtime_defaults

        apply_runtime_defaults()
        torch.set_num_threads(threads)  # the actor's CPU share, not every core of the node
        self.model = load_checkpoint(checkpoint_path, device=device).model
        self.batch_size = batch_size
        # Every actor decides on the same calibration captions (a local build's), so like hardware agrees.
        self.precision = (choose_precision(self.model, calibration, precision) if precision == "auto"
                          else precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from transresnet.encode import encode_captions

        started = time.perf_counter()
        vectors = encode_captions(self.model, batch["caption"].tolist(), batch_size=self.batch_size,
                                  precision=self.precision, progress=False)
        busy = (time.perf_counter() - started) / max(1, len(vectors))  # per row: sums to the actors' busy time
        return {"row": batch["row"], "vector": vectors, "busy_s": np.full(len(vectors), busy),
                "precision": np.full(len(vectors), self.precision, dtype=object)}


def _blocks(table: CaptionTable, options: BuildOptions) -> list[Any]:
    """(row, caption) Arrow tables, enough of them that every actor gets several."""
    import pyarrow as pa

    n = len(table)
    per_call = options.batch_size * ENCODE_CALLS_PER_BATCH
    size = max(1, min(per_call, math.ceil(n / (options.workers * BLOCKS_PER_WORKER))))
    return [pa.table({"row": np.arange(start, min(n, start + size), dtype=np.int64),
                      "caption": table.captions[start:start + size]}) for start in range(0, n, size)]


@dataclass
class Encoded:
    """What the encoder actors did: their precision and the seconds they spent encoding (all actors
    together; startup and waiting excluded), the basis of the per-worker throughput."""

    precision: str
    busy_s: float


def _store_batch(batch: dict[str, np.ndarray], vectors: np.ndarray, seen: np.ndarray, precisions: set[str]) -> float:
    """Write one encoded block at its rows (each row exactly once); returns the actor's busy seconds."""
    rows = batch["row"]
    if seen[rows].any():
        raise RayBuildError(f"Ray returned {int(seen[rows].sum())} caption rows twice; no index version was "
                            "published")
    vectors[rows] = batch["vector"]
    seen[rows] = True
    precisions.update(batch["precision"].tolist())
    return float(batch["busy_s"].sum())


def encode_ray(ray: Any, table: CaptionTable, checkpoint: Checkpoint, options: BuildOptions, vectors: np.ndarray,
               *, encoder: type[CaptionEncoder] = CaptionEncoder, max_retries: int = 2,
               progress: bool | None = None) -> Encoded:
    """Fill ``vectors`` (row i = ``table`` row i) on a pool of ``options.workers`` encoder actors.
    Raises RayBuildError when an actor's batch keeps failing or rows are missing."""
    from transresnet.encode import calibration_sample

    n = len(table)
    # The local engine's calibration captions: every actor decides "auto" on exactly what a local build would.
    kwargs = {"checkpoint_path": str(Path(checkpoint.path).resolve()),
              "device": "cuda" if options.gpus_per_worker > 0 else "cpu", "precision": options.precision,
              "calibration": calibration_sample(table.captions), "batch_size": options.batch_size,
              "threads": options.cpus_per_worker}
    dataset = ray.data.from_arrow(_blocks(table, options))
    with warnings.catch_warnings():
        # Ray 2.60 deprecates these two actor arguments without a replacement yet (pyproject pins < 2.64).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        encoded = dataset.map_batches(
            encoder, fn_constructor_kwargs=kwargs, batch_size=None, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=options.workers), num_cpus=options.cpus_per_worker,
            num_gpus=options.gpus_per_worker or None,
            # A killed actor is restarted and its batch retried this often; then the build fails (not hangs).
            max_restarts=max_retries, max_task_retries=max_retries)
    seen = np.zeros(n, dtype=bool)
    precisions: set[str] = set()
    busy = 0.0
    bar = progress_reporter(n, f"encoding {n} captions on {options.workers} Ray workers", "captions",
                            enabled=progress)
    try:
        with bar:
            for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
                busy += _store_batch(batch, vectors, seen, precisions)
                bar.update(len(batch["row"]))
    except ray.exceptions.RayError as err:  # a dead actor, or a batch's own error, wrapped by Ray
        raise _plain(err, "the encoding") from err
    if not seen.all():
        raise RayBuildError(f"{int((~seen).sum())} of {n} caption rows came back from Ray without vectors; no "
                           "index version was published")
    if len(precisions) != 1:
        raise RayBuildError(f"the encoder actors chose different precisions {sorted(precisions)} (mixed "
                           "hardware?); pass --precision float32")
    return Encoded(precisions.pop(), busy)


# ------------------------------------------------------------------------------------------ add


def _train_sample(n: int, spec: fx.IndexSpec, train_ids: np.ndarray | None, seed: int) -> np.ndarray:
    """The rows :func:`faiss_index.build_faiss_index` trains on (same seed, same draw), so both engines
    train the same quantizer."""
    pool = np.arange(n) if train_ids is None else np.asarray(train_ids)
    size = min(len(pool), fx.training_sample_size(spec, n))
    return np.sort(np.random.default_rng(seed).choice(pool, size=size, replace=False))


def _add_part(trained: np.ndarray, vectors: np.ndarray, start: int) -> np.ndarray:
    """A Ray task: a copy of the trained empty index with rows ``start..`` added, serialized."""
    index = faiss.deserialize_index(trained)
    index.add_with_ids(vectors, np.arange(start, start + len(vectors), dtype=np.int64))
    return faiss.serialize_index(index)


def can_add_in_parallel(spec: fx.IndexSpec) -> bool:
    """IVF lists merge (``merge_from``); a graph (HNSW), a refine stage or an exact index do not need or allow it,
    and on a GPU the driver adds faster itself."""
    return spec.type in ("ivf", "ivfpq") and not spec.refine and fx.gpu_count() == 0


def parallel_builder(ray: Any, workers: int):
    """A :data:`build.Builder` that trains on the driver and adds IVF vectors in parallel Ray tasks."""
    add_part = ray.remote(num_cpus=1)(_add_part)

    def build(vectors: np.ndarray, spec: fx.IndexSpec, *, train_ids: np.ndarray | None = None,
              seed: int = 0) -> tuple[faiss.Index, dict[str, float]]:
        if not can_add_in_parallel(spec):
            return fx.build_faiss_index(vectors, spec, train_ids=train_ids, seed=seed)
        n, dim = vectors.shape
        index = fx.new_index(spec, dim)
        started = time.perf_counter()
        sample = _train_sample(n, spec, train_ids, seed)
        logger.info("training %s on %d of %d vectors", spec.factory(dim), len(sample), n)
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
        timings = {"train_s": time.perf_counter() - started}
        started = time.perf_counter()
        trained = ray.put(faiss.serialize_index(index))
        size = min(ADD_PART_ROWS, math.ceil(n / workers))
        pending: deque = deque()
        for start in range(0, n, size):
            part = np.ascontiguousarray(vectors[start:start + size], dtype=np.float32)
            pending.append(add_part.remote(trained, part, start))
            if len(pending) > 2 * workers:  # bounded object-store use; merged in row order
                index.merge_from(faiss.deserialize_index(ray.get(pending.popleft())), 0)
        while pending:
            index.merge_from(faiss.deserialize_index(ray.get(pending.popleft())), 0)
        timings["add_s"] = time.perf_counter() - started
        logger.info("added %d vectors to %s in %d Ray tasks in %.1fs", n, spec.factory(dim),
                    math.ceil(n / size), timings["add_s"])
        return index, timings

    return build


# ---------------------------------------------------------------------------------------- build


def cluster_nodes(ray: Any) -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def _engine_record(ray: Any, options: BuildOptions, files: int, parallel_add: bool) -> dict[str, Any]:
    resources = ray.cluster_resources()
    return {"name": "ray", "ray_version": ray.__version__, "address": options.ray_address or "local",
            "workers": options.workers, "cpus_per_worker": options.cpus_per_worker,
            "gpus_per_worker": options.gpus_per_worker, "nodes": cluster_nodes(ray),
            "cluster_cpus": resources.get("CPU", 0), "cluster_gpus": resources.get("GPU", 0), "read_tasks": files,
            "parallel_add": parallel_add}


@contextlib.contextmanager
def vector_file(root: Path, n: int, dim: int) -> Iterator[np.ndarray]:
    """A memory-mapped (n, dim) float32 file beside the versions (same disk), removed afterwards; one left
    by a killed build (its ``@host@pid`` writer gone) is removed first, as stale staging directories are."""
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root, VECTORS_PREFIX)
    folder = Path(tempfile.mkdtemp(prefix=VECTORS_PREFIX, suffix=f"@{socket.gethostname()}@{os.getpid()}",
                                   dir=root))
    try:
        yield np.lib.format.open_memmap(folder / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_resources(ray: Any, options: BuildOptions) -> None:
    """Refuse a worker shape this Ray instance can never host (Ray would wait for it forever); on a cluster
    given by --ray-address an autoscaler may still add such nodes, so there it is a warning."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if options.cpus_per_worker <= cpus and options.gpus_per_worker <= gpus:
        fit = min(cpus // options.cpus_per_worker,
                  gpus // options.gpus_per_worker if options.gpus_per_worker else options.workers)
        if fit < options.workers:
            logger.warning("the Ray cluster has room for %d of the %d encoder workers now (%g CPUs, %g GPUs); the "
                           "others start when resources free up", fit, options.workers, cpus, gpus)
        return
    problem = (f"an encoder worker needs {options.cpus_per_worker} CPUs and {options.gpus_per_worker:g} GPUs, "
               f"but the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs")
    if options.ray_address is None:
        raise ValueError(f"{problem}; lower --cpus-per-worker / --gpus-per-worker or pass --ray-address")
    logger.warning("%s; the build waits until the autoscaler adds such a node", problem)


def build_index_ray(checkpoint: Checkpoint, captions: Source | CaptionTable, out_root: str | Path,
                    options: BuildOptions, *, encoder: type[CaptionEncoder] = CaptionEncoder,
                    max_retries: int = 2, progress: bool | None = None) -> Published:
    """:func:`build.build_index` on Ray: read, encode on ``options.workers`` actors, add, publish.

    ``encoder``: the actor class (a subclass may wrap ``__call__``, e.g. to test a worker dying);
    ``max_retries``: restarts of a dead actor and retries of its batch before the build fails;
    ``progress``: as for the local engine (None = a bar on a terminal, log lines otherwise).
    """
    root = Path(out_root)
    with ray_session(options.ray_address) as ray, quiet_ray_data():
        check_resources(ray, options)
        started = time.perf_counter()
        if isinstance(captions, CaptionTable):
            table, files = captions, 0
        else:
            table, files = read_table_ray(ray, captions), len(source_files(captions))
        read_s = time.perf_counter() - started
        n, dim = len(table), checkpoint.model.embed_dim
        with vector_file(root, n, dim) as vectors:
            started = time.perf_counter()
            encoded = encode_ray(ray, table, checkpoint, options, vectors, encoder=encoder,
                                 max_retries=max_retries, progress=progress)
            vectors.flush()
            encode_s = time.perf_counter() - started
            rate = n / max(encode_s, 1e-9)
            logger.info("encoded %d captions on %d Ray workers in %.1fs (%.0f captions/s, %s)", n,
                        options.workers, encode_s, rate, encoded.precision)
            # Wall time includes actor startup (a checkpoint load each); busy time is the steady-state rate.
            encoding = {"precision": encoded.precision, "device": "cuda" if options.gpus_per_worker > 0 else "cpu",
                        "batch_size": options.batch_size, "seconds": round(encode_s, 3),
                        "captions_per_second": round(rate, 1), "workers": options.workers,
                        "worker_busy_s": round(encoded.busy_s, 3),
                        "captions_per_worker_second": round(n / max(encoded.busy_s, 1e-9), 1)}
            # On one node FAISS's own threads already add in parallel, and shipping the vectors to tasks only
            # costs (measured 2.6x slower on 2 cores, docs/scaling.md); across nodes the tasks add the CPUs up.
            parallel = cluster_nodes(ray) > 1
            return write_version(root, vectors=vectors, table=table, checkpoint_info=checkpoint_info(checkpoint),
                                 options=options, encoding=encoding, stages={"read_s": read_s, "encode_s": encode_s},
                                 engine=_engine_record(ray, options, files, parallel),
                                 builder=parallel_builder(ray, options.workers) if parallel else None,
                                 checkpoint=checkpoint)
