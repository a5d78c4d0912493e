"""FAISS index construction: index types, the ``auto`` choice, training, GPU placement and search tuning.

Every index scores by inner product (the model's score). Exact search (``flat``) is the default;
``ivf`` (IVF-Flat), ``hnsw`` and ``ivfpq`` trade a little recall for speed or memory, and their search
parameters (nprobe, efSearch, k_factor) are tuned at build time to reach a recall target against exact
search. On a machine with GPUs (``faiss.get_num_gpus() > 0``) indexes are trained, filled and searched
there, sharded over all GPUs when there are several; HNSW has no GPU implementation and stays on CPU.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from transresnet.options import IndexPlacement, choices

logger = logging.getLogger(__name__)

BLAS_THRESHOLD = 16
"""Query batches at least this large are scored with one BLAS matrix product. faiss-cpu 1.15 wheels ship
128000, which keeps every realistic batch on the one-vector-at-a-time kernel: exact search at batch 64
measured 8x slower than with BLAS (and 3x slower than numpy) on 100k x 500 vectors."""
if faiss.cvar.distance_compute_blas_threshold > BLAS_THRESHOLD:
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD

INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
BUILD_TYPES = (*INDEX_TYPES, "auto")
AUTO_EXACT_MAX = 100_000
"""``auto`` keeps exact search up to this many vectors: a brute-force query is still a few ms there."""
GPU_MAX_K = 2048
"""FAISS GPU kernels select at most this many neighbours (k, nprobe)."""
ADD_CHUNK = 65_536


# ------------------------------------------------------------------------------------------ specs


@dataclass
class IndexSpec:
    """What to build. ``None`` fields are derived from the data size by :func:`resolve_spec`."""

    type: str = "flat"
    nlist: int | None = None  # IVF lists
    pq_m: int | None = None  # PQ sub-quantizers (must divide the dimension)
    pq_bits: int | None = None  # bits per PQ code (8 unless the data is tiny)
    hnsw_m: int = 32  # HNSW graph degree
    ef_construction: int = 80  # HNSW build-time beam
    refine: bool = False  # ivfpq: re-rank PQ candidates with the exact vectors (IndexRefineFlat)
    reason: str = ""  # why this type (auto) or "requested"

    def factory(self, dim: int) -> str:
        if self.type == "flat":
            return "Flat"
        if self.type == "ivf":
            return f"IVF{self.nlist},Flat"
        if self.type == "hnsw":
            return f"HNSW{self.hnsw_m},Flat"
        if self.type == "ivfpq":
            return f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_bits}" + (",RFlat" if self.refine else "")
        raise ValueError(f"unknown index type {self.type!r}; choose one of {', '.join(BUILD_TYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse_bytes(text: str | int) -> int:
    """'4G', '512MiB', '1.5GB', 1000 -> bytes (binary units either way)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match:
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 4G, 512M or 1.5GiB")
    number, unit = float(match.group(1)), match.group(2)
    return int(number * 1024 ** " kmgt".index(unit or " "))


def default_memory_budget() -> int:
    """Half the machine's RAM, at most 16 GiB (autofaiss's default ceiling)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return min(16 << 30, total // 2)


def default_nlist(n: int) -> int:
    """~4 sqrt(n) lists, a power of two, with at least 39 training points per list (FAISS's minimum)."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return nlist


def divisors(dim: int) -> list[int]:
    return [m for m in range(1, dim + 1) if dim % m == 0]


def default_pq_m(dim: int, dims_per_code: int = 4) -> int:
    """The largest sub-quantizer count leaving at least ``dims_per_code`` dimensions each."""
    return max(m for m in divisors(dim) if dim // m >= min(dims_per_code, dim))


def default_pq_bits(n: int) -> int:
    """8-bit codes need 256 * 39 training points; tiny corpora get fewer bits."""
    return max(1, min(8, int(math.log2(max(n, 2) / 39)) if n >= 78 else 1))


def estimate_memory(spec: IndexSpec, n: int, dim: int) -> int:
    """Approximate resident bytes of the built index (vectors/codes, ids, quantizers, graph links)."""
    vectors = 4 * n * dim
    if spec.type == "flat":
        return vectors
    if spec.type == "hnsw":
        return vectors + n * spec.hnsw_m * 2 * 4 * 11 // 10
    quantizer = 4 * (spec.nlist or default_nlist(n)) * dim
    if spec.type == "ivf":
        return vectors + 8 * n + quantizer
    pq_m = spec.pq_m or default_pq_m(dim)
    codes = n * (pq_m * (spec.pq_bits or 8) // 8 + 8) + 4 * dim * 2 ** (spec.pq_bits or 8)
    return codes + quantizer + (vectors if spec.refine else 0)


def choose_auto(n: int, dim: int, memory_budget: int) -> IndexSpec:
    """Pick an index type the way autofaiss does: by size first, then by what fits the memory budget."""
    flat = estimate_memory(IndexSpec("flat"), n, dim)
    if n <= AUTO_EXACT_MAX and flat <= memory_budget:
        return IndexSpec("flat", reason=f"{n} vectors <= {AUTO_EXACT_MAX}: exact search is fast enough "
                                        "and loses nothing")
    ivf = IndexSpec("ivf", nlist=default_nlist(n))
    if estimate_memory(ivf, n, dim) <= memory_budget:
        ivf.reason = (f"{n} vectors > {AUTO_EXACT_MAX}; full vectors ({_gib(flat)}) fit the "
                      f"{_gib(memory_budget)} budget, so IVF-Flat keeps exact scores and probes a few lists "
                      "(HNSW builds too slowly at this size and has no GPU version)")
        return ivf
    for pq_m in sorted(divisors(dim), reverse=True):
        if dim // pq_m > 32:
            break  # coarser codes than 32 dims per byte lose too much recall to be useful
        spec = IndexSpec("ivfpq", nlist=default_nlist(n), pq_m=pq_m, pq_bits=8)
        if estimate_memory(spec, n, dim) <= memory_budget:
            spec.reason = (f"full vectors ({_gib(flat)}) exceed the {_gib(memory_budget)} budget; "
                           f"IVF-PQ with {pq_m} bytes per vector fits ({_gib(estimate_memory(spec, n, dim))})")
            return spec
    raise ValueError(f"{n} vectors of dimension {dim} do not fit a {_gib(memory_budget)} memory budget even "
                     "with IVF-PQ; raise --memory-budget")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def resolve_spec(spec: IndexSpec, n: int, dim: int, memory_budget: int | None = None) -> IndexSpec:
    """Fill the size-dependent fields (or choose the type for ``auto``) and check they fit the data."""
    if spec.type == "auto":
        resolved = choose_auto(n, dim, memory_budget or default_memory_budget())
        logger.info("index type auto -> %s: %s", resolved.type, resolved.reason)
        chosen = {k: v for k, v in asdict(spec).items() if v is not None and k not in ("type", "reason")}
        spec = IndexSpec(**{**asdict(resolved), **chosen})  # explicit --nlist / --pq-m still apply
    elif spec.type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {spec.type!r}; choose one of {', '.join(BUILD_TYPES)}")
    spec = IndexSpec(**asdict(spec))
    spec.reason = spec.reason or "requested"
    if spec.type in ("ivf", "ivfpq"):
        spec.nlist = spec.nlist or default_nlist(n)
        if spec.nlist > n:
            raise ValueError(f"--nlist {spec.nlist} exceeds the {n} vectors; use at most n / 39")
    if spec.type == "ivfpq":
        spec.pq_m = spec.pq_m or default_pq_m(dim)
        spec.pq_bits = spec.pq_bits or default_pq_bits(n)
        if dim % spec.pq_m:
            raise ValueError(f"--pq-m {spec.pq_m} must divide the dimension {dim}; "
                             f"choose one of {divisors(dim)}")
    return spec


# ------------------------------------------------------------------------------------------ GPU

GPU_SCRATCH_BYTES = 3 << 29
"""Memory FAISS keeps free per GPU beyond the index itself: StandardGpuResources reserves up to 1.5 GiB of
scratch space for search temporaries, so an index must leave that much of a device's free memory."""


@dataclass(frozen=True)
class Placement:
    """Where an index is searched, and why: ``cpu``, ``gpu`` (one device), ``sharded`` (the vectors split over
    ``gpus`` devices: memory adds up) or ``replicated`` (a full copy on each of ``gpus`` devices: queries are
    split between them)."""

    kind: str
    gpus: int = 0
    reason: str = ""

    @property
    def on_gpu(self) -> bool:
        return self.kind != "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "gpus": self.gpus, "reason": self.reason}

    def __str__(self) -> str:
        where = {"cpu": "CPU", "gpu": "1 GPU", "sharded": f"sharded over {self.gpus} GPUs",
                 "replicated": f"replicated on {self.gpus} GPUs"}[self.kind]
        return f"{where} ({self.reason})"


def _fits(need: int, free: Sequence[int] | None) -> bool:
    return free is None or all(need + GPU_SCRATCH_BYTES <= f for f in free)


def _shortfall(need: int, free: Sequence[int]) -> str:
    return f"needs {_gib(need + GPU_SCRATCH_BYTES)} per GPU with FAISS scratch, {_gib(min(free))} free"


def choose_placement(ngpu: int, index_kind: str, index_bytes: int, free_bytes: Sequence[int] | None = None, *,
                     prefer: IndexPlacement = "auto", mmap: bool = False) -> Placement:
    """Where to search an index of ``index_kind`` ("flat", "ivf", "ivfpq", "hnsw") holding ``index_bytes``
    on a machine whose FAISS sees ``ngpu`` GPUs with ``free_bytes`` free on each (None: not known, assumed
    to fit). ``prefer``: auto/shard = one GPU, or the vectors sharded over all of them; replicate = a full
    copy on each (more throughput, no more capacity); cpu = stay on CPU. Pure: no FAISS or CUDA call."""
    if ngpu < 0 or index_bytes < 0:
        raise ValueError(f"GPU count and index size must be >= 0, got {ngpu} GPUs and {index_bytes} bytes")
    if prefer not in choices(IndexPlacement):
        raise ValueError(f"unknown index placement {prefer!r}; choose one of {', '.join(choices(IndexPlacement))}")
    if free_bytes is not None and len(free_bytes) != ngpu:
        raise ValueError(f"free memory given for {len(free_bytes)} GPUs, but there are {ngpu}")
    if prefer == "cpu":
        return Placement("cpu", reason="CPU requested")
    if mmap:
        return Placement("cpu", reason="a memory-mapped index is searched where it lies, on CPU")
    if ngpu == 0:
        return Placement("cpu", reason="FAISS sees no GPU")
    if index_kind == "hnsw":
        return Placement("cpu", reason="FAISS has no GPU version of HNSW")
    known = "" if free_bytes is not None else "; free GPU memory unknown"
    if ngpu == 1:
        if _fits(index_bytes, free_bytes):
            return Placement("gpu", 1, f"the one GPU FAISS sees holds the {_gib(index_bytes)} index{known}")
        return Placement("cpu", reason=f"the {_gib(index_bytes)} index does not fit the GPU: "
                                       f"{_shortfall(index_bytes, free_bytes or [])}")
    if prefer == "replicate":
        if _fits(index_bytes, free_bytes):
            return Placement("replicated", ngpu, f"replication requested: a full {_gib(index_bytes)} copy on "
                                                 f"each of {ngpu} GPUs{known}")
        why = f"a full copy on each GPU {_shortfall(index_bytes, free_bytes or [])}, so sharded instead: "
    else:
        why = ""
    share = -(-index_bytes // ngpu)
    if _fits(share, free_bytes):
        return Placement("sharded", ngpu, f"{why}{ngpu} GPUs hold {_gib(share)} each of the "
                                          f"{_gib(index_bytes)} index{known}")
    return Placement("cpu", reason=f"{why}the {_gib(index_bytes)} index does not fit {ngpu} GPUs even sharded: "
                                   f"{_shortfall(share, free_bytes or [])}")


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def gpu_free_bytes(ngpu: int) -> list[int] | None:
    """Free memory of each of the ``ngpu`` devices FAISS sees (torch's count, same CUDA_VISIBLE_DEVICES), or
    None when it cannot be read: the placement then assumes the index fits and FAISS says if it does not."""
    if ngpu == 0:
        return None
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() != ngpu:
            return None
        return [int(torch.cuda.mem_get_info(device)[0]) for device in range(ngpu)]
    except Exception as err:  # noqa: BLE001 - a driver problem must not stop the index from loading
        logger.debug("cannot read free GPU memory (%s)", err)
        return None


def index_kind(index: faiss.Index) -> str:
    """"flat", "ivf", "ivfpq" or "hnsw" for a CPU index (a refined index counts as its base), else its class."""
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexRefine):
        return index_kind(inner.base_index)
    for cls, kind in ((faiss.IndexHNSW, "hnsw"), (faiss.IndexIVFPQ, "ivfpq"), (faiss.IndexIVF, "ivf"),
                      (faiss.IndexFlat, "flat")):
        if isinstance(inner, cls):
            return kind
    return type(inner).__name__


def place_index(index: faiss.Index, prefer: IndexPlacement = "auto", *, mmap: bool = False
                ) -> tuple[faiss.Index, Placement]:
    """The index to search (a GPU clone, or ``index`` itself) and where it is, chosen by
    :func:`choose_placement` from this machine's GPUs; logged."""
    ngpu = gpu_count()
    wanted = prefer != "cpu" and not mmap and ngpu > 0
    free = gpu_free_bytes(ngpu) if wanted else None
    nbytes = index_memory_bytes(index) if wanted else 0
    placement = choose_placement(ngpu, index_kind(index), nbytes, free, prefer=prefer, mmap=mmap)
    placed = index
    if placement.on_gpu:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = placement.kind == "sharded"  # split the vectors (memory adds up) rather than copy them
        try:
            placed = faiss.index_cpu_to_all_gpus(index, co=options, ngpu=placement.gpus)
        except Exception as err:  # noqa: BLE001 - FAISS raises RuntimeError/assertions for unsupported layouts
            placement = Placement("cpu", reason=f"FAISS cannot put this index on the GPU "
                                                f"({str(err).splitlines()[0][:200]})")
    # A GPU machine searching on CPU for want of memory or FAISS support is worth a warning; HNSW is expected.
    surprising = wanted and not placement.on_gpu and index_kind(index) != "hnsw"
    logger.log(logging.WARNING if surprising else logging.INFO, "index placement: %s", placement)
    return placed, placement


def to_gpu(index: faiss.Index, prefer: IndexPlacement = "auto") -> faiss.Index | None:
    """The index cloned onto the GPU(s) as :func:`choose_placement` decides (sharded when several), or None
    on a CPU machine or when FAISS has no GPU version of this index (HNSW, some PQ code sizes) or it does
    not fit: the caller keeps the CPU index."""
    placed, placement = place_index(index, prefer)
    return placed if placement.on_gpu else None


def _parts(index: faiss.Index) -> list[faiss.Index]:
    """Sub-indexes of a sharded/replicated index (IndexShards, IndexShardsIVF, IndexReplicas), else []."""
    if hasattr(index, "at") and hasattr(index, "count"):
        return [faiss.downcast_index(index.at(i)) for i in range(index.count())]
    return []


def is_gpu_index(index: faiss.Index) -> bool:
    inner = faiss.downcast_index(index)
    parts = _parts(inner)
    if parts:
        return is_gpu_index(parts[0])
    return type(inner).__name__.startswith("Gpu")


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (what gets saved); CPU indexes pass through."""
    return faiss.index_gpu_to_cpu(index) if is_gpu_index(index) else index


# --------------------------------------------------------------------------------------- building


def new_index(spec: IndexSpec, dim: int) -> faiss.Index:
    # index_factory already returns the concrete class; downcast_index would return a non-owning view.
    index = faiss.index_factory(dim, spec.factory(dim), faiss.METRIC_INNER_PRODUCT)
    base = faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index
    if isinstance(base, faiss.IndexIVFPQ):
        base.do_polysemous_training = False  # costly, and only serves polysemous search, which we do not use
    return index


def training_sample_size(spec: IndexSpec, n: int) -> int:
    """Enough points for k-means (64 per list) and for 8-bit PQ codebooks, capped at the corpus."""
    if spec.type not in ("ivf", "ivfpq"):
        return 0
    wanted = 64 * (spec.nlist or 1)
    if spec.type == "ivfpq":
        wanted = max(wanted, 64 * 2 ** (spec.pq_bits or 8))
    return min(n, wanted)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def build_faiss_index(vectors: np.ndarray, spec: IndexSpec, *, train_ids: np.ndarray | None = None,
                      seed: int = 0, use_gpu: bool = True) -> tuple[faiss.Index, dict[str, float]]:
    """Train (on a sample) and fill an index with ``vectors`` (row i gets id i).

    Returns the index, on the GPU when one is available and the type supports it, and build timings.
    ``train_ids`` restricts the training sample (e.g. to exclude held-out tuning queries).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    timings: dict[str, float] = {}
    index = new_index(spec, dim)
    if use_gpu:
        index = to_gpu(index) or index
    if not index.is_trained:
        started = time.perf_counter()
        pool = np.arange(n) if train_ids is None else np.asarray(train_ids)
        size = min(len(pool), training_sample_size(spec, n))
        sample = np.sort(np.random.default_rng(seed).choice(pool, size=size, replace=False))
        logger.info("training %s on %d of %d vectors", spec.factory(dim), size, n)
        index.train(vectors[sample])
        timings["train_s"] = time.perf_counter() - started
    started = time.perf_counter()
    for part in _chunks(n, ADD_CHUNK):
        index.add(vectors[part])
    timings["add_s"] = time.perf_counter() - started
    logger.info("added %d vectors to %s in %.1fs", n, spec.factory(dim), timings["add_s"])
    return index, timings


# ---------------------------------------------------------------------------------- parameters


def _unwrap(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index)


def apply_params(index: faiss.Index, params: dict[str, float]) -> None:
    """Set search parameters on the index itself (persisted by write_index). Not for concurrent use."""
    index = _unwrap(index)
    if isinstance(index, faiss.IndexRefine):
        if "k_factor" in params:
            index.k_factor = float(params["k_factor"])
        apply_params(index.base_index, {k: v for k, v in params.items() if k != "k_factor"})
        return
    if isinstance(index, faiss.IndexHNSW):
        if "efSearch" in params:
            index.hnsw.efSearch = int(params["efSearch"])
        return
    if "nprobe" not in params:
        return
    if hasattr(index, "nprobe"):
        index.nprobe = int(params["nprobe"])  # CPU IVF, GPU IVF (faiss >= 1.8) and IndexShardsIVF
    for part in _parts(index):
        apply_params(part, params)
    if not hasattr(index, "nprobe") and not _parts(index) and is_gpu_index(index):
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(params["nprobe"]))


def current_params(index: faiss.Index) -> dict[str, float]:
    index = _unwrap(index)
    if isinstance(index, faiss.IndexRefine):
        return {**current_params(index.base_index), "k_factor": float(index.k_factor)}
    if isinstance(index, faiss.IndexHNSW):
        return {"efSearch": int(index.hnsw.efSearch)}
    if isinstance(index, faiss.IndexIVF):
        return {"nprobe": int(index.nprobe)}
    return {}


def search_parameters(index: faiss.Index, params: dict[str, float],
                      selector: faiss.IDSelector | None = None) -> faiss.SearchParameters:
    """Per-call search parameters (thread-safe: the index is not modified); CPU indexes only."""
    index = _unwrap(index)
    if isinstance(index, faiss.IndexRefine):
        base = search_parameters(index.base_index, params, selector)
        return faiss.IndexRefineSearchParameters(k_factor=float(params.get("k_factor", index.k_factor)),
                                                 base_index_params=base)
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=int(params.get("efSearch", index.hnsw.efSearch)), sel=selector)
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=int(params.get("nprobe", index.nprobe)), sel=selector)
    return faiss.SearchParameters(sel=selector)


def exhaustive_params(index: faiss.Index, n: int) -> dict[str, float]:
    """Parameters that make an approximate index look at (nearly) everything; a filter fallback."""
    index = _unwrap(index)
    if isinstance(index, faiss.IndexRefine):
        return {**exhaustive_params(index.base_index, n), "k_factor": 64.0}
    if isinstance(index, faiss.IndexHNSW):
        return {"efSearch": max(index.hnsw.efSearch, min(n, 4096))}
    if isinstance(index, faiss.IndexIVF):
        return {"nprobe": index.nlist}
    return {}


# ---------------------------------------------------------------------------------- exact search


def flat_vectors(index: faiss.Index) -> np.ndarray | None:
    """A zero-copy (n, d) view of a CPU exact index's stored vectors (valid while the index lives),
    or None for any other index."""
    inner = faiss.downcast_index(index)
    if not isinstance(inner, faiss.IndexFlat) or inner.ntotal == 0:
        return None
    return faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(inner.ntotal, inner.d)


def blas_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k by one BLAS product (a matrix-vector product for one query)."""
    scores = queries @ vectors.T
    n = scores.shape[1]
    if k < n:
        top = np.argpartition(scores, n - k, axis=1)[:, n - k:]  # the k largest, unordered
    else:
        top = np.broadcast_to(np.arange(n), scores.shape)
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return (np.take_along_axis(top_scores, order, axis=1).astype(np.float32, copy=False),
            np.take_along_axis(top, order, axis=1).astype(np.int64, copy=False))


def search(index: faiss.Index, queries: np.ndarray, k: int, *, flat_view: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """``index.search``, except that exact search of fewer than BLAS_THRESHOLD queries scores the index's
    own vectors with BLAS: faiss-cpu 1.15's one-query kernel measured 2-3x slower than OpenBLAS's
    matrix-vector product (numpy's) on 10k-1M x 500 vectors, while batches are faster through FAISS. A view
    that is not float-aligned (a memory-mapped file's vectors start at an odd byte offset) is left to FAISS:
    numpy multiplies unaligned arrays without BLAS, 15x slower than FAISS (measured at 40k x 512)."""
    if flat_view is not None and flat_view.flags.aligned and len(queries) < BLAS_THRESHOLD:
        return blas_topk(flat_view, queries, k)
    return index.search(queries, k)


# --------------------------------------------------------------------------------------- recall


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth: exact inner-product top-k (GPU when available)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if gpu_count() == 0:
        return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)  # no copy of the vectors
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    flat = to_gpu(flat) or flat
    return flat.search(queries, k)


def drop_self(ids: np.ndarray, self_ids: np.ndarray | None, k: int) -> np.ndarray:
    """Remove each query's own id from its result row (held-out caption queries) and keep k."""
    if self_ids is None:
        return ids[:, :k]
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for row, (found, own) in enumerate(zip(ids, self_ids, strict=True)):
        kept = found[found != own][:k]
        out[row, : len(kept)] = kept
    return out


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k (k-recall@k)."""
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist()) - {-1}) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits)) / k


@dataclass
class TuneResult:
    params: dict[str, float]
    recall: float
    target: float
    k: int
    reached: bool
    tried: list[dict[str, Any]] = field(default_factory=list)


def _candidates(index: faiss.Index, k: int) -> list[dict[str, float]]:
    """Parameter settings from cheapest to most thorough."""
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexRefine):
        base = _candidates(inner.base_index, k)
        return [{**b, "k_factor": f} for f in (1.0, 2.0, 4.0, 8.0, 16.0) for b in base]
    if isinstance(inner, faiss.IndexHNSW):
        return [{"efSearch": ef} for ef in sorted({max(k, e) for e in (16, 24, 32, 48, 64, 96, 128, 192,
                                                                        256, 384, 512, 1024, 2048, 4096)})]
    nlist = getattr(inner, "nlist", None) or _shard_nlist(index)
    if nlist:
        cap = min(nlist, GPU_MAX_K) if is_gpu_index(index) else nlist
        probes = sorted({min(cap, p) for p in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256,
                                               384, 512, 768, 1024, 1536, 2048, 4096, 8192, 16384)} | {cap})
        return [{"nprobe": p} for p in probes if p <= cap]
    return [{}]


def _shard_nlist(index: faiss.Index) -> int | None:
    parts = _parts(faiss.downcast_index(index))
    return getattr(parts[0], "nlist", None) if parts else None


PLATEAU_STEPS = 3
"""Stop widening a search once this many wider settings in a row gained under 0.002 recall (PQ codes
cap recall however many lists are probed, and probing them all is as slow as exact search)."""


def tune_search(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, *, k: int, target: float,
                self_ids: np.ndarray | None = None) -> TuneResult:
    """Cheapest search parameters whose recall@k against ``truth`` (exact top-k ids) reaches ``target``.

    With a refine stage, every k_factor gets its cheapest nprobe and the fastest passing pair wins.
    When nothing reaches the target the best setting found is kept and ``reached`` is False.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    fetch = k + (1 if self_ids is not None else 0)
    tried: list[dict[str, Any]] = []
    passing: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    done_groups: set[float] = set()
    group_best: dict[float, float] = {}
    stalls: dict[float, int] = {}
    for params in _candidates(index, k):
        group = params.get("k_factor", 0.0)
        if group in done_groups:
            continue
        apply_params(index, params)
        started = time.perf_counter()
        _, ids = index.search(queries, fetch)
        seconds = time.perf_counter() - started
        recall = recall_at(drop_self(ids, self_ids, k), truth, k)
        row = {"params": params, "recall": recall, "seconds": seconds}
        tried.append(row)
        logger.debug("tune %s: recall@%d %.4f in %.3fs", params, k, recall, seconds)
        if best is None or recall > best["recall"]:
            best = row
        if recall >= target:
            passing.append(row)
            done_groups.add(group)  # more thorough settings in this group only cost more
            continue
        stalls[group] = stalls.get(group, 0) + 1 if recall < group_best.get(group, -1.0) + 0.002 else 0
        group_best[group] = max(group_best.get(group, -1.0), recall)
        if stalls[group] >= PLATEAU_STEPS:
            done_groups.add(group)
    choice = min(passing, key=lambda r: r["seconds"]) if passing else best
    assert choice is not None
    apply_params(index, choice["params"])
    result = TuneResult(params=dict(choice["params"]), recall=choice["recall"], target=target, k=k,
                        reached=bool(passing), tried=tried)
    if result.reached:
        logger.info("tuned %s: recall@%d %.3f >= %.3f", result.params, k, result.recall, target)
    else:
        logger.warning("no search setting reaches recall@%d %.3f (best %.3f with %s); use a larger index "
                       "(more PQ bytes, --refine) or type ivf/flat", k, target, result.recall, result.params)
    return result


# --------------------------------------------------------------------------------------- memory


def index_memory_bytes(index: faiss.Index) -> int:
    """Bytes held by a CPU index's vectors/codes, ids, quantizers and graph."""
    index = _unwrap(index)
    if isinstance(index, faiss.IndexRefine):
        return index_memory_bytes(index.base_index) + index_memory_bytes(index.refine_index)
    if isinstance(index, faiss.IndexHNSW):
        links = index.hnsw.neighbors.size() * 4 + index.hnsw.offsets.size() * 8 + index.hnsw.levels.size() * 4
        return index_memory_bytes(index.storage) + links
    if isinstance(index, faiss.IndexIVF):
        invlists = index.invlists
        stored = sum(invlists.list_size(i) for i in range(index.nlist))
        extra = 0
        if isinstance(index, faiss.IndexIVFPQ):
            extra = index.pq.centroids.size() * 4 + index.precomputed_table.size() * 4
        return stored * (index.code_size + 8) + index_memory_bytes(index.quantizer) + extra
    if isinstance(index, faiss.IndexFlatCodes):
        return index.ntotal * index.code_size
    return index.ntotal * index.d * 4
