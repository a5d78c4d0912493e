"""Loading a published caption index and searching it.

``load_index`` refuses an index that does not belong to the checkpoint it will serve with (other text
fingerprint or dimension), or whose files are missing, truncated or corrupted, with a message holding
the command that rebuilds it (``verify.open_version`` does the file checks, NaN/inf vectors included).
With ``fallback=True`` (a starting server) an INDEX_ROOT whose CURRENT is bad is served from its newest
version that verifies, loudly. ``CaptionIndex.search`` is safe to call from many threads at once: CPU
searches never modify the index (filters and widened searches use per-call parameters), GPU searches
are serialised because FAISS GPU indexes are not thread-safe.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from transresnet.keys import text_key
from transresnet.options import IndexPlacement

from . import faiss_index as fx
from .captions import PERSONALITY
from .options import BuildOptions
from .store import (
    CAPTION,
    CURRENT,
    ID,
    ROW,
    IndexLoadError,
    is_version_dir,
    list_versions,
    read_current,
    read_manifest,
    resolve_version_dir,
    stays_inside_versions,
    version_name_problem,
    versions_dir,
)
from .verify import open_version

if TYPE_CHECKING:
    from transresnet.checkpoint import Checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One ranked caption."""

    id: str  # the caption's id in the source file (its row number there when the source has none)
    score: float  # inner product of query and caption vector (the model's score)
    caption: str
    metadata: dict[str, Any] = field(default_factory=dict)  # other source columns (personality, image, ...)
    row: int = -1  # position in the index (the FAISS id)


def rebuild_command(manifest: dict[str, Any], root: Path, checkpoint_path: str | Path | None = None) -> str:
    """The exact `transresnet index build` command that rebuilds this index (for ``checkpoint_path``)."""

    checkpoint = checkpoint_path or manifest.get("checkpoint", {}).get("path", "CHECKPOINT_DIR")
    parts = ["transresnet index build", f"--checkpoint {checkpoint}",
             f"--captions {manifest.get('source', {}).get('path', 'CAPTIONS_FILE')}", f"--out {root}"]
    try:
        parts += BuildOptions.model_validate(manifest.get("build", {}).get("options", {})).flags()
    except ValidationError:
        pass  # a manifest from an older build: the command without its tuning flags still rebuilds it
    return " ".join(parts)


def _index_root(version_dir: Path) -> Path:
    return version_dir.parent.parent


@dataclass(frozen=True)
class IndexFallback:
    """Why the served version is not the one CURRENT names: ``wanted`` failed verification (``reason``)."""

    wanted: str | None  # what CURRENT holds (None: no CURRENT file)
    serving: str
    reason: str

    def to_dict(self) -> dict[str, str | None]:
        return {"wanted": self.wanted, "serving": self.serving, "reason": self.reason}


class CaptionIndex:
    """A FAISS index of caption vectors plus the captions and their metadata, row i = FAISS id i."""

    def __init__(self, index: faiss.Index, captions: pa.Table, manifest: dict[str, Any], path: Path,
                 placement: fx.Placement | None = None) -> None:
        self._index = index
        self._captions = captions
        self.manifest = manifest
        self.path = path
        self.version = path.name
        self.dim = int(manifest["dim"])
        self._on_gpu = fx.is_gpu_index(index)
        self.placement = placement or fx.Placement("gpu" if self._on_gpu else "cpu", int(self._on_gpu),
                                                   "placed by the caller")
        self._flat_view = None if self._on_gpu else fx.flat_vectors(index)  # exact: small-batch BLAS path
        self._gpu_lock = threading.Lock()
        self._tags_lock = threading.Lock()
        self._tags: dict[str, tuple[np.ndarray, faiss.IDSelector, np.ndarray]] | None = None
        self._metadata_columns = [c for c in captions.column_names if c not in (ROW, ID, CAPTION)]
        self.fallback: IndexFallback | None = None  # set by load_index(fallback=True) when CURRENT was bad

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __repr__(self) -> str:
        return (f"CaptionIndex({self.path}, {len(self)} captions, {self.manifest['index']['type']}, "
                f"{self.placement.kind})")

    @property
    def on_gpu(self) -> bool:
        return self._on_gpu

    @property
    def faiss_index(self) -> faiss.Index:
        return self._index

    def caption_texts(self) -> list[str]:
        """Every caption in row order (row i = FAISS id i)."""
        return self._captions.column(CAPTION).to_pylist()

    # ----------------------------------------------------------------------------------- tags

    @property
    def has_personality_tags(self) -> bool:
        return PERSONALITY in self._metadata_columns

    def personality_counts(self) -> dict[str, int]:
        """Tagged trait (as first written in the data) -> number of captions carrying it."""
        return {name: len(rows) for name, (rows, _, _) in self._tag_index().values()}  # type: ignore[misc]

    def _tag_index(self) -> dict[str, Any]:
        """normalised trait -> (display name, (rows, selector, bitmap)); built once, on first use."""
        with self._tags_lock:
            if self._tags is None:
                self._tags = self._build_tags()
            return self._tags

    def _build_tags(self) -> dict[str, Any]:
        column = self._captions.column(PERSONALITY)
        values = pc.fill_null(column, "").to_numpy(zero_copy_only=False)
        tags: dict[str, Any] = {}
        uniques, inverse = np.unique(values, return_inverse=True)
        for position, name in enumerate(uniques):
            key = text_key(str(name))
            if not key:
                continue
            rows = np.flatnonzero(inverse == position).astype(np.int64)
            if key in tags:  # spellings differing in case/spacing are one trait
                rows = np.union1d(tags[key][1][0], rows)
                name = tags[key][0]
            bitmap = np.zeros(len(values), dtype=bool)
            bitmap[rows] = True
            packed = np.packbits(bitmap, bitorder="little")
            tags[key] = (str(name), (rows, faiss.IDSelectorBitmap(len(values), faiss.swig_ptr(packed)), packed))
        return tags

    def _tagged(self, personality: str) -> tuple[np.ndarray, faiss.IDSelector]:
        if not self.has_personality_tags:
            source = self.manifest["source"]["path"]
            raise ValueError(f"this index has no personality tags (its caption source {source} has no "
                             "'personality' column); search without a personality filter or rebuild "
                             "from captions that carry one")
        entry = self._tag_index().get(text_key(personality))
        if entry is None:
            known = sorted(name for name, _ in self._tag_index().values())
            shown = ", ".join(known[:20]) + (f" ... ({len(known)} in all)" if len(known) > 20 else "")
            raise ValueError(f"no caption in this index is tagged with personality {personality!r}; "
                             f"tagged personalities: {shown or 'none'}")
        rows, selector, _ = entry[1]
        return rows, selector

    # --------------------------------------------------------------------------------- search

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (batch, {self.dim}); got {tuple(queries.shape)} "
                             f"(this index holds {self.dim}-d vectors of checkpoint "
                             f"{self.manifest['checkpoint']['fingerprint']})")
        if not np.isfinite(queries).all():
            raise ValueError("query vectors contain NaN or infinity")
        return np.ascontiguousarray(queries)

    def _check_k(self, k: int, available: int, what: str) -> None:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if k > available:
            raise ValueError(f"k={k} exceeds the {available} {what}; ask for k <= {available}")
        if self._on_gpu and k > fx.GPU_MAX_K:
            raise ValueError(f"k={k} exceeds the GPU limit of {fx.GPU_MAX_K}; ask for fewer captions")

    def _raw_search(self, queries: np.ndarray, k: int, params: faiss.SearchParameters | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        if self._on_gpu:
            with self._gpu_lock:
                return self._index.search(queries, k)
        if params is None:
            return fx.search(self._index, queries, k, flat_view=self._flat_view)
        return self._index.search(queries, k, params=params)

    def search_ids(self, queries: np.ndarray, k: int, personality: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores (B, k) float32, rows (B, k) int64), best first; rows index the captions.

        With ``personality`` only captions tagged with that trait are ranked. Rows are -1 (score -inf)
        only if an approximate index could not find k tagged captions.
        """
        queries = self._check_queries(queries)
        if personality is None:
            self._check_k(k, len(self), "captions in this index")
            return _drop_nan(*self._raw_search(queries, k))
        rows, selector = self._tagged(personality)
        self._check_k(k, len(rows), f"captions tagged {personality!r}")
        if self._on_gpu:
            return _drop_nan(*self._overfetch_filtered(queries, k, rows))
        return _drop_nan(*self._selector_filtered(queries, k, selector))

    def _selector_filtered(self, queries: np.ndarray, k: int, selector: faiss.IDSelector
                           ) -> tuple[np.ndarray, np.ndarray]:
        params = fx.search_parameters(self._index, {}, selector)
        scores, ids = self._raw_search(queries, k, params)
        short = np.flatnonzero((ids < 0).any(axis=1))
        if len(short):
            # The tuned nprobe/efSearch did not reach k tagged captions: look everywhere for those rows.
            wide = fx.search_parameters(self._index, fx.exhaustive_params(self._index, len(self)), selector)
            scores[short], ids[short] = self._raw_search(queries[short], k, wide)
        return scores, ids

    def _overfetch_filtered(self, queries: np.ndarray, k: int, rows: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray]:
        """GPU indexes take no ID selector: fetch more than k and keep the tagged ones."""
        fetch = min(len(self), fx.GPU_MAX_K, max(4 * k, math.ceil(2 * k * len(self) / len(rows))))
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        scores, ids = self._raw_search(queries, fetch)
        keep = np.isin(ids, rows)
        for i in range(len(queries)):
            found = np.flatnonzero(keep[i])[:k]
            out_scores[i, : len(found)] = scores[i, found]
            out_ids[i, : len(found)] = ids[i, found]
        if (out_ids < 0).any():
            logger.warning("personality filter found fewer than %d tagged captions in the top %d", k, fetch)
        return out_scores, out_ids

    def search(self, queries: np.ndarray, k: int, personality: str | None = None) -> list[list[Hit]]:
        """Top-k captions per query vector (queries: (B, D), or one (D,) vector), best first."""
        scores, ids = self.search_ids(queries, k, personality)
        return self.hits(scores, ids)

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """Turn (scores, rows) arrays into Hit lists, skipping -1 rows."""
        valid = ids >= 0
        rows = self._captions.take(pa.array(ids[valid], type=pa.int64())).to_pylist()
        records = iter(rows)
        results: list[list[Hit]] = []
        for query_scores, query_ids, query_valid in zip(scores, ids, valid, strict=True):
            hits = []
            for score, row, ok in zip(query_scores, query_ids, query_valid, strict=True):
                if not ok:
                    continue
                record = next(records)
                metadata = {c: record[c] for c in self._metadata_columns}
                hits.append(Hit(id=record[ID], score=float(score), caption=record[CAPTION], metadata=metadata,
                                row=int(row)))
            results.append(hits)
        return results


def _drop_nan(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Never rank a NaN score: such hits become empty slots (row -1, score -inf) and are logged. Loading
    refuses non-finite vectors, so this only guards against vectors changed in memory."""
    nan = np.isnan(scores)
    if nan.any():
        logger.error("%d search results scored NaN (rows %s); they are dropped", int(nan.sum()),
                     np.unique(ids[nan])[:5].tolist())
        scores, ids = scores.copy(), ids.copy()
        scores[nan], ids[nan] = -np.inf, -1
    return scores, ids


# --------------------------------------------------------------------------------------- loading


def check_compatible(manifest: dict[str, Any], version_dir: Path, *, checkpoint: Checkpoint | None = None,
                     fingerprint: str | None = None) -> None:
    """Refuse an index built with another text encoder (fingerprint) or of another dimension."""
    recorded = manifest["checkpoint"]
    if not isinstance(recorded.get("fingerprint"), str):
        raise IndexLoadError(f"{version_dir}/manifest.json records no checkpoint fingerprint: it is corrupted; "
                             "rebuild it with `transresnet index build`", reason="manifest lacks the fingerprint")
    root = _index_root(version_dir)
    if checkpoint is not None:
        command = rebuild_command(manifest, root, checkpoint.path)
        if checkpoint.model.embed_dim != manifest["dim"]:
            raise IndexLoadError(f"index {version_dir} holds {manifest['dim']}-d vectors but checkpoint "
                                 f"{checkpoint.path} produces {checkpoint.model.embed_dim}-d vectors; "
                                 f"rebuild the index for this checkpoint: {command}",
                                 reason=f"{manifest['dim']}-d vectors, the checkpoint produces "
                                        f"{checkpoint.model.embed_dim}-d")
        fingerprint = checkpoint.fingerprint
    else:
        command = rebuild_command(manifest, root, "CHECKPOINT_DIR")
    if fingerprint is not None and fingerprint != recorded["fingerprint"]:
        raise IndexLoadError(f"index {version_dir} was built with text encoder fingerprint "
                             f"{recorded['fingerprint']} (checkpoint {recorded.get('path')}), but the checkpoint "
                             f"in use has fingerprint {fingerprint}: its caption vectors would not match the "
                             f"queries. Rebuild the index for this checkpoint: {command}",
                             reason=f"built for text encoder {recorded['fingerprint'][:12]}, not {fingerprint[:12]}")


def load_index(path: str | Path, *, checkpoint: Checkpoint | None = None, fingerprint: str | None = None,
               mmap: bool = False, verify: bool = True, use_gpu: bool = True, fallback: bool = False,
               placement: IndexPlacement = "auto") -> CaptionIndex:
    """Load INDEX_ROOT's current version (or the version directory ``path``).

    ``checkpoint``/``fingerprint``: refuse an index built for another text encoder. ``mmap``: map the
    FAISS file instead of reading it (large indexes; stays on CPU). ``verify``: check sha256 of every
    file (sizes are always checked). ``use_gpu``: move the index to the GPU(s) when FAISS has some, as
    ``placement`` prefers (``faiss_index.choose_placement``: auto/shard/replicate/cpu); the choice and its
    reason are the returned index's ``placement``.
    ``fallback``: when ``path`` is an INDEX_ROOT whose CURRENT names a version that fails to load (invalid
    pointer, missing, truncated or corrupted files, non-finite vectors, another checkpoint), load the
    newest other version that verifies and fits the checkpoint instead, log a WARNING and record why in
    the returned index's ``fallback``; without one that verifies, the original error is raised.
    """
    kwargs: dict[str, Any] = {"checkpoint": checkpoint, "fingerprint": fingerprint, "mmap": mmap, "verify": verify,
                              "use_gpu": use_gpu, "placement": placement}
    path = Path(path)
    if not fallback or is_version_dir(path):
        return load_version(resolve_version_dir(path), **kwargs)
    try:
        return load_version(resolve_version_dir(path), **kwargs)
    except IndexLoadError as err:
        if not versions_dir(path).is_dir():
            raise
        wanted = _pointer_text(path)
        return _load_fallback(path, wanted, err, **kwargs)


def _pointer_text(root: Path) -> str | None:
    try:
        return read_current(root)
    except IndexLoadError:
        return None


def _load_fallback(root: Path, wanted: str | None, err: IndexLoadError, **kwargs: Any) -> CaptionIndex:
    """The newest version other than ``wanted`` that loads (verifies and fits the checkpoint)."""
    skipped: list[str] = []
    for name in reversed(list_versions(root)):
        if name == wanted:
            continue
        if version_name_problem(name) is not None or not stays_inside_versions(root, name):
            logger.warning("fallback skips %r in %s: not a plain version directory", name, versions_dir(root))
            continue
        try:
            caption_index = load_version(versions_dir(root) / name, **kwargs)
        except IndexLoadError as other:
            logger.warning("fallback candidate index version %r is not usable either: %s", name, other.reason)
            skipped.append(f"{name}: {other.reason}")
            continue
        caption_index.fallback = IndexFallback(wanted=wanted, serving=name, reason=err.reason)
        logger.warning("INDEX FALLBACK: %s names version %r, which failed verification (%s); serving version %r, "
                       "the newest that verifies. Fix the pointer with `transresnet index rollback %s` (or "
                       "rebuild); details: %s", root / CURRENT, wanted, err.reason, name, root, err)
        return caption_index
    tried = f"; no other version verifies either ({'; '.join(skipped)})" if skipped else \
        "; there is no other version to fall back to"
    raise IndexLoadError(f"{err}{tried}", reason=err.reason) from None


def load_version(version_dir: Path, *, checkpoint: Checkpoint | None = None, fingerprint: str | None = None,
                 mmap: bool = False, verify: bool = True, use_gpu: bool = True,
                 placement: IndexPlacement = "auto") -> CaptionIndex:
    """Load one version directory after checking it (see ``load_index``)."""
    manifest = read_manifest(version_dir)
    check_compatible(manifest, version_dir, checkpoint=checkpoint, fingerprint=fingerprint)
    rebuild = rebuild_command(manifest, _index_root(version_dir), checkpoint.path if checkpoint else None)
    index, captions = open_version(version_dir, manifest, checksums=verify, mmap=mmap, rebuild=rebuild)
    index, where = fx.place_index(index, placement if use_gpu else "cpu", mmap=mmap)
    logger.info("loaded caption index %s: %d captions, %s %s, on %s", version_dir, index.ntotal,
                manifest["index"].get("type"), manifest["index"].get("search_params") or "", where.kind)
    return CaptionIndex(index, captions, manifest, version_dir, where)
