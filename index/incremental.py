"""`transresnet index add` and `transresnet index remove`: a new version from the current one, without a
full rebuild.

``add_captions`` encodes only the captions the index does not hold yet and adds their vectors to a copy of
the current version's FAISS index (flat: appended; IVF-Flat / IVF-PQ: assigned to the trained lists, the
quantizer and PQ codebooks reused; HNSW: inserted into the graph). ``remove_captions`` drops the rows of
the given caption ids (flat: compacted; IVF: removed from the lists and renumbered; HNSW, which cannot
remove, is rebuilt from its stored vectors). Either way FAISS id i stays captions row i, approximate
indexes have their tuned search parameters re-checked against exact search (and re-tuned when they
fall short of the recall target), and the version is published through the same staging directory,
manifest, checksums and atomic CURRENT as a build. The manifest's ``lineage`` records the operation, the
parent version and the sha256 of the parent's files and of the input file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import pyarrow as pa

from transresnet.files import sha256_file
from transresnet.keys import text_key

from . import faiss_index as fx
from . import store
from .build import (
    Published,
    Tuning,
    TuningQueries,
    _manifest,
    build_and_tune,
    checkpoint_info,
    encode_table,
    held_out_rows,
    publish_version,
    refuse_nonfinite,
    tune_index,
    tuning_queries,
)
from .captions import (
    CSV_SUFFIXES,
    ID,
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    READERS,
    CaptionTable,
    checked,
    collect,
    describe_source,
    read_rows,
    source_files,
)
from .options import BuildOptions, UpdateOptions
from .search import check_compatible
from .verify import SHOWN_IDS, open_version

if TYPE_CHECKING:
    from transresnet.checkpoint import Checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    """What an add or remove did: the published version, or None when there was nothing to change."""

    operation: str
    parent: str
    published: Published | None
    message: str


@dataclass
class Parent:
    """The current version of an index root, verified (sizes and sha256) before its files were read."""

    root: Path
    path: Path
    manifest: dict[str, Any]
    index: faiss.Index
    captions: pa.Table

    @property
    def version(self) -> str:
        return self.path.name


# ------------------------------------------------------------------------------------------ parent


def open_parent(root: str | Path, operation: str, checkpoint: Checkpoint | None = None) -> Parent:
    """The current version of ``root``, refused when its files fail their recorded checksums or when
    ``checkpoint`` is not the text encoder it was built with."""
    root = Path(root)
    if not store.versions_dir(root).is_dir():
        raise store.IndexLoadError(f"no caption index at {root} (no {store.VERSIONS}/ folder); build one first "
                                   f"with `transresnet index build --checkpoint CKPT --captions FILE --out {root}`")
    path = store.resolve_version_dir(root)
    manifest = store.read_manifest(path)
    if checkpoint is not None:
        try:
            check_compatible(manifest, path, checkpoint=checkpoint)
        except store.IndexLoadError as err:
            raise store.IndexLoadError(f"refusing to {operation}: {err}", reason=err.reason) from None
    try:
        index, captions = open_version(path, manifest, checksums=True, mmap=False)
    except store.IndexLoadError as err:
        raise store.IndexLoadError(f"refusing to {operation} on top of a bad version: {err}. Repair CURRENT with "
                                   f"`transresnet index rollback {root}` first", reason=err.reason) from None
    return Parent(root, path, manifest, index, captions)


def parent_options(manifest: dict[str, Any], update: UpdateOptions | None) -> BuildOptions:
    """The options the parent was built with (defaults where its manifest predates them), updated."""
    recorded = manifest.get("build", {}).get("options", {})
    known = {k: v for k, v in recorded.items() if k in BuildOptions.model_fields} if isinstance(recorded, dict) else {}
    options = BuildOptions.model_validate(known)
    if options.queries is not None and not Path(options.queries).is_file():
        logger.warning("the query vectors %s the parent was tuned with are gone; re-checking recall with "
                       "held-out photo queries or caption vectors", options.queries)
        options = options.model_copy(update={"queries": None})
    return (update or UpdateOptions()).over(options)


def parent_spec(manifest: dict[str, Any]) -> fx.IndexSpec:
    """The resolved index type and parameters the parent was built with (kept by every update)."""
    params = manifest["index"].get("params", {})
    names = {f.name for f in fields(fx.IndexSpec)}
    return fx.IndexSpec(**{k: v for k, v in params.items() if k in names})


def table_of(captions: pa.Table, source: dict[str, Any]) -> CaptionTable:
    """A version's captions as a CaptionTable (row i = FAISS id i), metadata columns as stored."""
    metadata = {name: captions.column(name).to_pylist() for name in captions.column_names
                if name not in (store.ROW, store.ID, store.CAPTION)}
    counts = {name: int(source.get(name, 0) or 0) for name in ("rows", "dropped_empty", "dropped_duplicate")}
    return CaptionTable(captions=captions.column(store.CAPTION).to_pylist(),
                        ids=captions.column(store.ID).to_pylist(), metadata=metadata,
                        source=str(source.get("path", "")), format=str(source.get("format", "")),
                        rows_read=counts["rows"], dropped_empty=counts["dropped_empty"],
                        dropped_duplicate=counts["dropped_duplicate"])


def _with_rows(table: CaptionTable, captions: list[str], ids: list[str],
               metadata: dict[str, list[str | None]]) -> CaptionTable:
    return CaptionTable(captions=captions, ids=ids, metadata=metadata, source=table.source, format=table.format,
                        rows_read=table.rows_read, dropped_empty=table.dropped_empty,
                        dropped_duplicate=table.dropped_duplicate)


def concat_tables(old: CaptionTable, new: CaptionTable) -> CaptionTable:
    """``old``'s rows then ``new``'s; a column only one side has is empty (None) on the other."""
    names = list(dict.fromkeys([*old.metadata, *new.metadata]))
    metadata = {name: [*old.metadata.get(name, [None] * len(old)), *new.metadata.get(name, [None] * len(new))]
                for name in names}
    return _with_rows(old, old.captions + new.captions, old.ids + new.ids, metadata)


def take_rows(table: CaptionTable, rows: np.ndarray) -> CaptionTable:
    """The rows ``rows`` of ``table``, in that order."""
    picked = rows.tolist()
    return _with_rows(table, [table.captions[i] for i in picked], [table.ids[i] for i in picked],
                      {name: [values[i] for i in picked] for name, values in table.metadata.items()})


# -------------------------------------------------------------------------------------- new captions


def next_free_number(ids: list[str]) -> int:
    """One more than the largest all-digit id (0 when there is none): where id-less new rows are numbered from."""
    numbers = [int(i) for i in ids if i.isdigit()]
    return max(numbers) + 1 if numbers else 0


def read_new_captions(source: str | Path, start: int) -> CaptionTable:
    """Caption files read and deduplicated like a build's, except that a row without an id is numbered from
    ``start`` (as if the file were appended to the index's source), so it cannot take an existing row number."""
    files = source_files(source)
    label, fmt = describe_source(source, files)

    def numbered() -> Any:
        for number, row in enumerate(row for path in files for row in read_rows(path)):
            raw = row.get(ID)
            if raw is None or not str(raw).strip():
                row = {**row, ID: str(start + number)}
            yield row

    return checked(collect(numbered(), source=label, fmt=fmt))


def new_rows(parent: CaptionTable, new: CaptionTable) -> tuple[CaptionTable, int]:
    """The rows of ``new`` whose text the index does not hold yet, and how many were skipped as duplicates.
    Refuses new ids that the index already has (or that repeat within ``new``)."""
    held = {text_key(text) for text in parent.captions}
    fresh = np.array([i for i, text in enumerate(new.captions) if text_key(text) not in held], dtype=np.int64)
    skipped = len(new) - len(fresh)
    kept = take_rows(new, fresh)
    existing = set(parent.ids)
    seen: set[str] = set()
    clashes: list[str] = []
    for caption_id in kept.ids:
        if caption_id in existing or caption_id in seen:
            clashes.append(caption_id)
        seen.add(caption_id)
    if clashes:
        shown = ", ".join(map(repr, clashes[:SHOWN_IDS])) + (", ..." if len(clashes) > SHOWN_IDS else "")
        raise ValueError(f"{len(clashes)} of the {len(kept)} new captions in {new.source} have ids that the index "
                         f"already holds for other captions (or that repeat in the file): {shown}. Caption ids "
                         "must stay unique: give these captions new ids in the file's 'id' column, or remove the "
                         "old captions first with `transresnet index remove`")
    return kept, skipped


# ------------------------------------------------------------------------------------------ ids file


IDS_HELP = "an ids file is a .csv/.tsv or .parquet with an 'id' column, a .jsonl with an 'id' field per line, " \
           "or any other file with one caption id per line"


def read_ids(path: str | Path) -> list[str]:
    """Caption ids to remove, in file order without repeats (blank ones skipped): see :data:`IDS_HELP`. The
    tabular formats go through the caption sources' readers, asked for the 'id' field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ids file {path} not found; {IDS_HELP}")
    suffix = path.suffix.lower()
    fmt = next((name for name, suffixes in (("csv", CSV_SUFFIXES), ("jsonl", JSONL_SUFFIXES),
                                             ("parquet", PARQUET_SUFFIXES)) if suffix in suffixes), None)
    try:
        if fmt is None:
            values: list[Any] = path.read_text(encoding="utf-8").splitlines()
        else:
            values = [row.get(ID) for row in READERS[fmt](path, field=ID, hint=IDS_HELP)]
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; {IDS_HELP}") from None
    ids = list(dict.fromkeys(text for text in (None if v is None else str(v).strip() for v in values) if text))
    if not ids:
        raise ValueError(f"{path} holds no caption ids; {IDS_HELP}")
    return ids


def rows_to_remove(table: CaptionTable, ids: list[str], source: Path) -> tuple[np.ndarray, list[str]]:
    """Index rows holding the given ids (every row of an id the index holds twice) and the unknown ids.
    Refuses a file naming none of the index's ids, and one naming all of them."""
    wanted = set(ids)
    rows = np.array([row for row, caption_id in enumerate(table.ids) if caption_id in wanted], dtype=np.int64)
    found = {table.ids[row] for row in rows.tolist()}
    unknown = [caption_id for caption_id in ids if caption_id not in found]
    if unknown:
        shown = ", ".join(map(repr, unknown[:SHOWN_IDS])) + (", ..." if len(unknown) > SHOWN_IDS else "")
        logger.warning("%d of the %d ids in %s are not in the index: %s", len(unknown), len(ids), source, shown)
    if len(rows) == 0:
        raise ValueError(f"none of the {len(ids)} ids in {source} is in the index (first: "
                         f"{', '.join(map(repr, ids[:SHOWN_IDS]))}); nothing was removed. Ids are the 'id' column "
                         "the index was built from (`transresnet index query --json` shows them)")
    if len(rows) == len(table):
        raise ValueError(f"{source} names every one of the index's {len(table)} captions; an index keeps at least "
                         "one. Build a new index from other captions with `transresnet index build` instead")
    return rows, unknown


# ----------------------------------------------------------------------------------- FAISS updates


def append_vectors(index: faiss.Index, vectors: np.ndarray) -> str:
    """Add ``vectors`` as ids ntotal, ntotal+1, ...: flat appends, IVF assigns them to the trained lists
    (quantizer and codebooks unchanged), HNSW inserts them into its graph, a refine stage keeps them too."""
    for start in range(0, len(vectors), fx.ADD_CHUNK):
        index.add(np.ascontiguousarray(vectors[start:start + fx.ADD_CHUNK], dtype=np.float32))
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        return "inserted into the parent's HNSW graph"
    if isinstance(inner, (faiss.IndexIVF, faiss.IndexRefine)):
        return "added to the parent's IVF lists (trained quantizer and codes reused)"
    return "appended to the parent's flat index"


def renumber_ivf(ivf: faiss.IndexIVF, mapping: np.ndarray) -> None:
    """Replace every stored id i by ``mapping[i]`` in place (codes unchanged)."""
    invlists = ivf.invlists
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size == 0:
            continue
        ids_ptr = invlists.get_ids(list_no)
        codes_ptr = invlists.get_codes(list_no)
        try:
            ids = faiss.rev_swig_ptr(ids_ptr, size).copy()
            codes = faiss.rev_swig_ptr(codes_ptr, size * invlists.code_size).copy()
        finally:
            invlists.release_ids(list_no, ids_ptr)
            invlists.release_codes(list_no, codes_ptr)
        renumbered = np.ascontiguousarray(mapping[ids], dtype=np.int64)
        invlists.update_entries(list_no, 0, size, faiss.swig_ptr(renumbered), faiss.swig_ptr(codes))


def remove_rows(index: faiss.Index, rows: np.ndarray) -> str:
    """Remove ``rows`` in place and renumber so the kept rows are 0..n-1 in their old order. Flat indexes
    compact; IVF lists drop the entries and get the new numbers; a refine stage does both. Not for HNSW."""
    inner = faiss.downcast_index(index)
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(rows, dtype=np.int64))
    if isinstance(inner, faiss.IndexRefine):
        base, refine = faiss.downcast_index(inner.base_index), faiss.downcast_index(inner.refine_index)
        mapping = _mapping(int(inner.ntotal), rows)
        base.remove_ids(selector)
        renumber_ivf(base, mapping)
        refine.remove_ids(selector)  # a flat store: compacts in order
        inner.ntotal = base.ntotal
        return "removed from the IVF lists and the refine vectors, ids renumbered"
    if isinstance(inner, faiss.IndexIVF):
        mapping = _mapping(int(inner.ntotal), rows)
        inner.remove_ids(selector)
        renumber_ivf(inner, mapping)
        return "removed from the parent's IVF lists, ids renumbered (trained quantizer and codes reused)"
    inner.remove_ids(selector)  # IndexFlat: later rows move down, order kept
    return "compacted the parent's flat index"


def _mapping(n: int, removed: np.ndarray) -> np.ndarray:
    """Old id -> new id (rank among the kept ids); -1 for a removed one."""
    keep = np.ones(n, dtype=bool)
    keep[removed] = False
    mapping = np.full(n, -1, dtype=np.int64)
    mapping[keep] = np.arange(int(keep.sum()), dtype=np.int64)
    return mapping


def stored_vectors(index: faiss.Index) -> tuple[np.ndarray, bool]:
    """Every stored vector, row i = id i, and whether they are exact (IVF-PQ without refine gives its
    decoded codes: the exact vectors are not kept)."""
    inner = faiss.downcast_index(index)
    n = int(inner.ntotal)
    if isinstance(inner, faiss.IndexRefine):
        return faiss.downcast_index(inner.refine_index).reconstruct_n(0, n), True
    if isinstance(inner, faiss.IndexIVF):
        inner.make_direct_map(True)  # reconstruct by id; dropped again so the saved file has none
        try:
            vectors = inner.reconstruct_n(0, n)
        finally:
            inner.set_direct_map_type(faiss.DirectMap.NoMap)
        return vectors, not isinstance(inner, faiss.IndexIVFPQ)
    return inner.reconstruct_n(0, n), True


# ---------------------------------------------------------------------------------------- recall


def recheck_tuning(index: faiss.Index, spec: fx.IndexSpec, options: BuildOptions,
                   queries: TuningQueries | None = None) -> tuple[Tuning, dict[str, Any]]:
    """Measure the parent's tuned search parameters on the updated index against exact search (with
    ``queries``, else the build's choice without a checkpoint); keep them when they still reach the recall
    target, else re-tune (the build's tuning). Flat is exact."""
    if spec.type == "flat":
        return Tuning({}, 1.0, None, None, None, "exact", 0, 0.0), {"exact": True}
    started = time.perf_counter()
    vectors, exact = stored_vectors(index)
    n = len(vectors)
    queries = queries or tuning_queries(options, vectors.shape[1])
    held_out = None if queries is not None else held_out_rows(n, options.tune_queries, options.seed)
    k = max(1, min(options.recall_k, n - 1))
    query_vectors = queries.vectors if queries is not None else vectors[held_out]
    _, truth = fx.exact_search(vectors, query_vectors, k + (held_out is not None))
    truth = fx.drop_self(truth, held_out, k)
    params = fx.current_params(index)
    _, found = index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k + (held_out is not None))
    recall = fx.recall_at(fx.drop_self(found, held_out, k), truth, k)
    truth_of = "exact vectors" if exact else "decoded PQ codes (exact vectors are not stored: PQ loss not counted)"
    record = {"params": params, "recall": recall, "target": options.recall_target, "k": k,
              "reached": recall >= options.recall_target, "truth": truth_of, "retuned": False}
    source = queries.source if queries is not None else "held-out caption vectors"
    if recall >= options.recall_target:
        logger.info("the parent's search parameters %s still reach recall@%d %.3f >= %.3f", params, k, recall,
                    options.recall_target)
        return Tuning(params, recall, options.recall_target, k, True, source, len(query_vectors),
                      time.perf_counter() - started), record
    logger.warning("the parent's search parameters %s reach recall@%d %.3f < %.3f on the updated index; "
                   "re-tuning", params, k, recall, options.recall_target)
    record["retuned"] = True
    return tune_index(index, vectors, spec, options, held_out=held_out, queries=queries), record


# --------------------------------------------------------------------------------------- publish


def file_record(path: Path) -> dict[str, Any]:
    return {"path": str(path.resolve()), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _lineage(parent: Parent, operation: str, entry: dict[str, Any], recheck: dict[str, Any]) -> dict[str, Any]:
    history = parent.manifest.get("lineage", {}).get("history", [])
    parent_record = {"version": parent.version, "count": int(parent.manifest["count"]),
                     "created": parent.manifest.get("created"),
                     "manifest_sha256": sha256_file(parent.path / store.MANIFEST_FILE),
                     "files": parent.manifest["files"]}
    return {"operation": operation, "parent": parent_record, **entry, "recheck": recheck,
            "history": [*history, {"operation": operation, "parent": parent.version,
                                   **{k: v for k, v in entry.items() if k in ("added", "removed", "input")}}]}


def publish_update(parent: Parent, *, index: faiss.Index, table: CaptionTable, spec: fx.IndexSpec,
                   options: BuildOptions, tuning: Tuning, timings: dict[str, float], info: dict[str, Any],
                   encoding: dict[str, Any], lineage: dict[str, Any]) -> Published:
    """The build's staging/manifest/publish path; refuses to publish when CURRENT moved meanwhile."""
    started = time.perf_counter()
    fx.apply_params(index, tuning.params)  # persisted, as a build does
    timings["tune_s"] = tuning.seconds

    def manifest_for(version: str) -> dict[str, Any]:
        current = store.read_current(parent.root)
        if current != parent.version:
            raise RuntimeError(f"{parent.root / store.CURRENT} changed to {current!r} during this "
                               f"{lineage['operation']} (it started from {parent.version!r}); nothing was "
                               "published: run it again on top of the new version")
        timings["write_s"] = time.perf_counter() - started
        timings["total_s"] = sum(v for k, v in timings.items() if k != "total_s")
        manifest = _manifest(version=version, checkpoint_info=info, table=table, spec=spec, index=index,
                             tuning=tuning, timings=timings, options=options, encoding=encoding)
        manifest["source"] = parent.manifest.get("source", manifest["source"])  # where the index began
        manifest["lineage"] = {**lineage, "version": version}
        return manifest

    return publish_version(parent.root, index, table, manifest_for, keep=options.keep)


# ------------------------------------------------------------------------------------ operations


def add_captions(root: str | Path, captions: str | Path, checkpoint: Checkpoint, update: UpdateOptions | None = None,
                 *, progress: bool | None = None) -> Update:
    """Publish the current version of ``root`` plus the captions of ``captions`` it does not hold yet
    (same text key = already held: skipped and counted); only those are encoded."""
    started = time.perf_counter()
    source_files(captions)  # a missing or unreadable-format source fails before the parent's checksums are read
    parent = open_parent(root, "add captions", checkpoint)
    options = parent_options(parent.manifest, update)
    old = table_of(parent.captions, parent.manifest.get("source", {}))
    read, fresh, skipped = select_new(old, captions)
    if len(fresh) == 0:
        return Update("add", parent.version, None, f"nothing to add: all {len(read)} captions of {read.source} "
                                                   f"are already in version {parent.version}; nothing published")
    vectors, encoding = encode_table(checkpoint, fresh, options, progress=progress)
    refuse_nonfinite(vectors, fresh)
    timings = {"read_s": time.perf_counter() - started - encoding["seconds"], "encode_s": encoding["seconds"]}
    spec = parent_spec(parent.manifest)
    adding = time.perf_counter()
    how = grow(parent.index, vectors, spec)
    timings["add_s"] = time.perf_counter() - adding
    tuning, recheck = recheck_tuning(parent.index, spec, options,
                                     tuning_queries(options, vectors.shape[1], checkpoint, spec))
    entry = {"input": [file_record(path) for path in source_files(captions)], "rows": read.rows_read,
             "added": len(fresh), "encoded": len(fresh), "already_indexed": skipped,
             "dropped_duplicate": read.dropped_duplicate, "dropped_empty": read.dropped_empty, "index_update": how}
    published = publish_update(parent, index=parent.index, table=concat_tables(old, fresh), spec=spec,
                               options=options, tuning=tuning, timings=timings, info=checkpoint_info(checkpoint),
                               encoding=encoding, lineage=_lineage(parent, "add", entry, recheck))
    return Update("add", parent.version, published,
                  f"added {len(fresh)} captions to version {parent.version} ({skipped} already in the index "
                  f"skipped; encoded {len(fresh)}): {published.summary()}")


def select_new(old: CaptionTable, captions: str | Path) -> tuple[CaptionTable, CaptionTable, int]:
    """(the file as read, its captions the index lacks, how many it already holds), with warnings."""
    read = read_new_captions(captions, next_free_number(old.ids))
    fresh, skipped = new_rows(old, read)
    if skipped:
        logger.warning("%d of the %d captions in %s are already in the index (same text); skipped", skipped,
                       len(read), read.source)
    if len(fresh) and old.personalities is not None and fresh.personalities is None:
        logger.warning("%s has no personality column: its captions carry no personality tag (a filtered search "
                       "never returns them)", read.source)
    return read, fresh, skipped


def grow(index: faiss.Index, vectors: np.ndarray, spec: fx.IndexSpec) -> str:
    """Add the new vectors to the parent's index (see :func:`append_vectors`); warns when IVF lists trained
    on the earlier vectors now hold mostly later ones."""
    if spec.type in ("ivf", "ivfpq") and len(vectors) > index.ntotal:
        logger.warning("this add more than doubles the index (%d -> %d captions); its IVF lists stay those trained "
                       "on the earlier vectors: a full `transresnet index build` retrains them", index.ntotal,
                       index.ntotal + len(vectors))
    return append_vectors(index, vectors)


def remove_captions(root: str | Path, ids_file: str | Path, *, checkpoint: Checkpoint | None = None,
                    update: UpdateOptions | None = None) -> Update:
    """Publish the current version of ``root`` without the captions whose ids ``ids_file`` lists."""
    started = time.perf_counter()
    ids_file = Path(ids_file)
    ids = read_ids(ids_file)
    parent = open_parent(root, "remove captions", checkpoint)
    options = parent_options(parent.manifest, update)
    old = table_of(parent.captions, parent.manifest.get("source", {}))
    rows, unknown = rows_to_remove(old, ids, ids_file)
    spec = parent_spec(parent.manifest)
    kept_rows = np.setdiff1d(np.arange(len(old), dtype=np.int64), rows)
    timings = {"read_s": time.perf_counter() - started}
    queries = tuning_queries(options, int(parent.index.d), checkpoint, spec)
    index, how, tuning, recheck = shrink(parent.index, rows, spec, options, timings, queries)
    entry = {"input": [file_record(ids_file)], "requested": len(ids), "removed": len(rows),
             "unknown": len(unknown), "unknown_first": unknown[:SHOWN_IDS], "encoded": 0, "index_update": how}
    info = version_checkpoint(parent.manifest, checkpoint)
    published = publish_update(parent, index=index, table=take_rows(old, kept_rows), spec=spec, options=options,
                               tuning=tuning, timings=timings, info=info, encoding={"encoded": 0},
                               lineage=_lineage(parent, "remove", entry, recheck))
    unknown_note = f"; {len(unknown)} unknown ids ignored" if unknown else ""
    return Update("remove", parent.version, published,
                  f"removed {len(rows)} captions from version {parent.version}{unknown_note}: {published.summary()}")


def shrink(index: faiss.Index, rows: np.ndarray, spec: fx.IndexSpec, options: BuildOptions,
           timings: dict[str, float], queries: TuningQueries | None = None
           ) -> tuple[faiss.Index, str, Tuning, dict[str, Any]]:
    """The parent's index without ``rows`` (ids renumbered), how that was done, its tuning (with ``queries``)
    and re-check."""
    started = time.perf_counter()
    if spec.type != "hnsw":
        how = remove_rows(index, rows)
        timings["remove_s"] = time.perf_counter() - started
        return (index, how, *recheck_tuning(index, spec, options, queries))
    how = "HNSW cannot remove vectors: rebuilt from the parent's stored vectors without them"
    vectors, _ = stored_vectors(index)
    kept = np.setdiff1d(np.arange(len(vectors), dtype=np.int64), rows)
    logger.warning("%s (%d of %d rows kept)", how, len(kept), len(vectors))
    rebuilt, tuning, build_timings = build_and_tune(vectors[kept], spec, options, queries=queries)
    timings.update({k: v for k, v in build_timings.items() if k != "tune_s"})
    return rebuilt, how, tuning, {"rebuilt": True, "retuned": True}


def version_checkpoint(manifest: dict[str, Any], checkpoint: Checkpoint | None) -> dict[str, Any]:
    """The checkpoint record of a version: the given (checked) checkpoint's, else the parent's."""
    return checkpoint_info(checkpoint) if checkpoint is not None else dict(manifest["checkpoint"])

