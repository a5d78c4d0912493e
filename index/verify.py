"""Verifying published index versions: files, manifest, FAISS, counts and finite vectors; rollback.

``open_version`` is the one way a version's files are opened for serving (``load_index`` uses it), so
what ``transresnet index verify`` calls verified is exactly what a server accepts. ``rollback`` repoints
``CURRENT`` at a version only after it verifies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from . import faiss_index as fx
from . import store
from .store import INDEX_FILE, IndexLoadError

logger = logging.getLogger(__name__)

FINITE_CHUNK = 16_384
"""Rows checked for NaN/inf at a time: bounds the check's temporary memory (8 MiB at 512-d), and measured
fastest (39 ms for 200k x 512 float32, one thread; 68 ms in chunks of 65,536; the file's sha256 took 550 ms)."""
SHOWN_IDS = 5
"""Caption ids named in a non-finite-vector error."""


# --------------------------------------------------------------------------------- finite vectors


def _nonfinite_in(vectors: np.ndarray, offset: int = 0) -> np.ndarray:
    """Row numbers (plus ``offset``) of ``vectors`` rows holding NaN or infinity, checked in chunks."""
    bad: list[np.ndarray] = []
    for start in range(0, len(vectors), FINITE_CHUNK):
        chunk = vectors[start:start + FINITE_CHUNK]
        rows = np.flatnonzero(~np.isfinite(chunk).all(axis=1))
        if len(rows):
            bad.append(rows + start + offset)
    return np.concatenate(bad) if bad else np.empty(0, dtype=np.int64)


def nonfinite_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows of an (n, d) array holding NaN or infinity (the build-time check)."""
    return _nonfinite_in(np.asarray(vectors))


def _ivf_nonfinite(index: faiss.IndexIVF) -> np.ndarray:
    """Rows of an IVF index that are not finite: NaN/inf stored vectors (IVF-Flat) and rows stored in no
    list at all (FAISS drops a NaN vector it cannot assign to a list, yet counts it in ntotal)."""
    invlists = index.invlists
    flat = isinstance(index, faiss.IndexIVFFlat)
    bad: list[np.ndarray] = []
    stored: list[np.ndarray] = []
    for list_no in range(index.nlist):
        size = invlists.list_size(list_no)
        if size == 0:
            continue
        ids_ptr = invlists.get_ids(list_no)
        try:
            ids = np.array(faiss.rev_swig_ptr(ids_ptr, size), dtype=np.int64)
        finally:
            invlists.release_ids(list_no, ids_ptr)
        stored.append(ids)
        if flat:
            codes_ptr = invlists.get_codes(list_no)
            try:
                codes = faiss.rev_swig_ptr(codes_ptr, size * invlists.code_size)
                rows = _nonfinite_in(np.frombuffer(codes, dtype=np.float32).reshape(size, index.d))
            finally:
                invlists.release_codes(list_no, codes_ptr)
            if len(rows):
                bad.append(ids[rows])
    present = np.concatenate(stored) if stored else np.empty(0, dtype=np.int64)
    if len(present) != index.ntotal:
        bad.append(np.setdiff1d(np.arange(index.ntotal, dtype=np.int64), present))
    return np.unique(np.concatenate(bad)) if bad else np.empty(0, dtype=np.int64)


def _table_nonfinite(values: Any, name: str) -> list[str]:
    array = faiss.vector_to_array(values) if not isinstance(values, np.ndarray) else values
    return [] if np.isfinite(array).all() else [name]


def index_nonfinite(index: faiss.Index) -> tuple[np.ndarray, list[str], bool]:
    """(rows whose stored vector holds NaN/inf, non-finite model parts such as centroids, whether the stored
    vectors could be inspected) for a CPU index. Flat, IVF-Flat and HNSW-Flat vectors are read directly;
    PQ codes cannot be, but their centroids (and so every decoded vector) can."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexRefine):
        rows, parts, _ = index_nonfinite(inner.base_index)
        refine_rows, refine_parts, checked = index_nonfinite(inner.refine_index)
        return np.union1d(rows, refine_rows).astype(np.int64), parts + refine_parts, checked
    if isinstance(inner, faiss.IndexHNSW):
        return index_nonfinite(inner.storage)
    if isinstance(inner, faiss.IndexFlat):
        view = fx.flat_vectors(inner)
        return (np.empty(0, dtype=np.int64) if view is None else _nonfinite_in(view)), [], True
    if isinstance(inner, faiss.IndexIVF):
        quantizer_rows, _, _ = index_nonfinite(inner.quantizer)
        parts = ["IVF centroids"] if len(quantizer_rows) else []
        rows = _ivf_nonfinite(inner)
        if isinstance(inner, faiss.IndexIVFFlat):
            return rows, parts, True
        if isinstance(inner, faiss.IndexIVFPQ):
            parts += _table_nonfinite(inner.pq.centroids, "PQ centroids")
        return rows, parts, False
    return np.empty(0, dtype=np.int64), [], False


def describe_rows(rows: np.ndarray, ids: list[str], total: int) -> str:
    """'3 of 40 rows (rows 1, 5, 9; caption ids 'a', 'b', 'c')': ``ids`` are the first rows' caption ids."""
    more = ", ..." if len(rows) > SHOWN_IDS else ""
    shown = rows[:SHOWN_IDS].tolist()
    return (f"{len(rows)} of {total} rows (rows {', '.join(map(str, shown))}{more}; caption ids "
            f"{', '.join(map(repr, ids[:SHOWN_IDS]))}{more})")


def check_finite(index: faiss.Index, captions: pa.Table, manifest: dict[str, Any], version_dir: Path,
                 rebuild: str) -> None:
    """Refuse an index whose vectors (or centroids) hold NaN or infinity; for indexes whose vectors cannot
    be read back (PQ codes), the build's recorded check must say they were finite."""
    rows, parts, checked = index_nonfinite(index)
    if len(rows):
        ids = captions.column(store.ID).take(pa.array(rows[:SHOWN_IDS], type=pa.int64())).to_pylist()
        raise IndexLoadError(f"{version_dir / INDEX_FILE} holds NaN or infinite vectors in "
                             f"{describe_rows(rows, ids, int(index.ntotal))}: their scores would be NaN; rebuild "
                             f"it with a checkpoint whose text encoder gives finite vectors: {rebuild}",
                             reason=f"{len(rows)} non-finite vectors")
    if parts:
        raise IndexLoadError(f"{version_dir / INDEX_FILE} has non-finite {' and '.join(parts)}; rebuild it: "
                             f"{rebuild}", reason=f"non-finite {' and '.join(parts)}")
    if not checked and manifest.get("finite_vectors") is not True:
        raise IndexLoadError(f"{version_dir} holds {manifest['index'].get('type')} codes whose vectors cannot be "
                             "checked for NaN, and its manifest does not record that they were finite at build "
                             f"(built by an older version); rebuild it: {rebuild}",
                             reason="vectors not known to be finite")


# ------------------------------------------------------------------------------------------ open


MMAP_FLAGS = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY
"""Memory-map a FAISS file: ``IO_FLAG_MMAP_IFC`` maps the stored codes of every index type (flat, IVF lists,
HNSW storage, refine vectors); the older ``IO_FLAG_MMAP`` maps IVF lists only and reads a flat index whole."""


def read_faiss(path: Path, *, mmap: bool, rebuild: str) -> faiss.Index:
    flags = MMAP_FLAGS if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as err:
        raise IndexLoadError(f"{path} cannot be read by FAISS ({str(err).splitlines()[0][:200]}): the file is "
                             f"corrupted or truncated; rebuild it: {rebuild}",
                             reason=f"{INDEX_FILE} unreadable by FAISS") from None


def open_version(version_dir: Path, manifest: dict[str, Any], *, checksums: bool = True, mmap: bool = False,
                 rebuild: str = "transresnet index build") -> tuple[faiss.Index, pa.Table]:
    """The verified FAISS index (CPU) and caption table of a version: sizes (and sha256) of every file,
    FAISS readable, vector count and dimension as the manifest says, one caption per vector, finite
    vectors. Raises IndexLoadError saying what is wrong and how to rebuild."""
    store.verify_files(version_dir, manifest, checksums=checksums, rebuild=rebuild)
    index = read_faiss(version_dir / INDEX_FILE, mmap=mmap, rebuild=rebuild)
    if index.d != manifest["dim"] or index.ntotal != manifest["count"]:
        raise IndexLoadError(f"{version_dir / INDEX_FILE} holds {index.ntotal} vectors of dimension {index.d}, "
                             f"the manifest says {manifest['count']} of {manifest['dim']}; rebuild it: {rebuild}",
                             reason=f"{index.ntotal}x{index.d} vectors, manifest says "
                                    f"{manifest['count']}x{manifest['dim']}")
    captions_path = version_dir / store.captions_file(manifest)
    try:
        captions = store.read_captions_table(captions_path)
    except (OSError, pa.ArrowException) as err:
        raise IndexLoadError(f"{captions_path} cannot be read ({err}); rebuild it: {rebuild}",
                             reason=f"{captions_path.name} unreadable") from None
    if captions.num_rows != manifest["count"]:
        raise IndexLoadError(f"{captions_path} has {captions.num_rows} rows, the index "
                             f"{manifest['count']}; rebuild it: {rebuild}",
                             reason=f"{captions.num_rows} captions for {manifest['count']} vectors")
    check_finite(index, captions, manifest, version_dir, rebuild)
    return index, captions


# ---------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VersionCheck:
    """The outcome of verifying one version."""

    version: str
    ok: bool
    current: bool
    reason: str = ""
    count: int | None = None
    index_type: str | None = None
    created: str | None = None
    fingerprint: str | None = None

    def row(self) -> list[str]:
        return [self.version, "*" if self.current else "", "ok" if self.ok else "FAILED",
                "" if self.count is None else str(self.count), self.index_type or "", self.created or "",
                (self.fingerprint or "")[:12], self.reason]


VERIFY_HEADER = ["version", "current", "status", "captions", "type", "created", "fingerprint", "problem"]


def verify_version(version_dir: Path, *, current: bool = False, checksums: bool = True) -> VersionCheck:
    """Check one version directory completely (see ``open_version``); never raises IndexLoadError."""
    version_dir = Path(version_dir)
    manifest: dict[str, Any] = {}
    try:
        manifest = store.read_manifest(version_dir)
        index, _ = open_version(version_dir, manifest, checksums=checksums, mmap=True)
        del index
    except IndexLoadError as err:
        return _check(version_dir.name, manifest, current, ok=False, reason=err.reason)
    return _check(version_dir.name, manifest, current, ok=True)


def _check(version: str, manifest: dict[str, Any], current: bool, *, ok: bool, reason: str = "") -> VersionCheck:
    index = manifest.get("index") if isinstance(manifest.get("index"), dict) else {}
    checkpoint = manifest.get("checkpoint") if isinstance(manifest.get("checkpoint"), dict) else {}
    return VersionCheck(version=version, ok=ok, current=current, reason=reason, count=manifest.get("count"),
                        index_type=index.get("type"), created=manifest.get("created"),
                        fingerprint=checkpoint.get("fingerprint"))


@dataclass(frozen=True)
class RootCheck:
    """Every version of an index root, verified, and whether CURRENT points at a good one."""

    root: Path
    current: str | None
    pointer_problem: str | None
    versions: list[VersionCheck]

    @property
    def current_ok(self) -> bool:
        return self.pointer_problem is None and any(v.current and v.ok for v in self.versions)

    def table(self) -> str:
        from transresnet.tables import format_table

        return format_table(VERIFY_HEADER, [v.row() for v in reversed(self.versions)])


def _verify_listed(root: Path, name: str, *, current: bool, checksums: bool) -> VersionCheck:
    problem = store.version_name_problem(name)
    if problem is None and not store.stays_inside_versions(root, name):
        problem = f"resolves outside {store.VERSIONS}/"
    if problem is not None:
        return VersionCheck(version=name, ok=False, current=current, reason=f"the name {problem}")
    return verify_version(store.versions_dir(root) / name, current=current, checksums=checksums)


def verify_root(root: Path, *, checksums: bool = True) -> RootCheck:
    """Verify every published version under ``root`` (newest last) and the CURRENT pointer."""
    root = Path(root)
    current = store.read_current(root)
    problem: str | None = None
    if current is None:
        problem = f"no {store.CURRENT} file"
    else:
        try:
            store.version_path(root, current)
        except IndexLoadError as err:
            problem = err.reason
    checks = [_verify_listed(root, name, current=name == current, checksums=checksums)
              for name in store.list_versions(root)]
    current_check = next((c for c in checks if c.current), None)
    if problem is None and current_check is not None and not current_check.ok:
        problem = f"current version {current!r} fails verification: {current_check.reason}"
    return RootCheck(root, current, problem, checks)


# -------------------------------------------------------------------------------------- rollback


def rollback(root: Path, version: str | None = None) -> tuple[str | None, str]:
    """Repoint CURRENT at ``version`` (default: the newest verified version older than the current one, or
    the newest verified one when CURRENT names nothing usable) after verifying it; returns (old, new)."""
    root = Path(root)
    if not store.versions_dir(root).is_dir():
        raise IndexLoadError(f"no caption index at {root} (no {store.VERSIONS}/ folder); build one with "
                             f"`transresnet index build --checkpoint CKPT --captions FILE --out {root}`")
    current = store.read_current(root)
    target = _default_target(root, current) if version is None else _checked_target(root, version)
    store.set_current(root, target)
    logger.warning("index %s: %s now points at version %s (was %r)", root, store.CURRENT, target, current)
    return current, target


def _default_target(root: Path, current: str | None) -> str:
    versions = store.list_versions(root)
    candidates = versions[: versions.index(current)] if current in versions else versions
    failures = []
    for name in reversed(candidates):
        check = _verify_listed(root, name, current=False, checksums=True)
        if check.ok:
            return name
        failures.append(f"{name}: {check.reason}")
    where = f"older than the current version {current!r}" if current in versions else "at all"
    tried = f" (tried {'; '.join(failures)})" if failures else ""
    raise IndexLoadError(f"{root} has no verified version {where}{tried}; name one explicitly with "
                         f"`transresnet index rollback {root} VERSION` or rebuild with `transresnet index build`")


def _checked_target(root: Path, version: str) -> str:
    problem = store.version_name_problem(version)
    if problem is not None:
        raise IndexLoadError(f"version {version!r} {problem}; name one of: "
                             f"{', '.join(store.list_versions(root)) or 'none'}")
    path = store.versions_dir(root) / version
    if not path.is_dir():
        raise IndexLoadError(f"version {version!r} does not exist in {store.versions_dir(root)}; name one of: "
                             f"{', '.join(store.list_versions(root)) or 'none'}")
    check = _verify_listed(root, version, current=False, checksums=True)
    if not check.ok:
        raise IndexLoadError(f"refusing to point {root / store.CURRENT} at version {version!r}: it fails "
                             f"verification ({check.reason}); run `transresnet index verify {root}` to see "
                             "which versions are good")
    return version
