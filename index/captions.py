"""Candidate-caption sources: text files (one caption per line), CSV, JSONL or Parquet; one file, several,
or a folder of shards (its caption files, sorted by path, read as one source).

CSV, JSONL and Parquet rows need a ``caption`` field and may carry ``id``, ``personality`` and any other metadata
columns, which travel with the caption into the index. Empty captions and duplicates (same text up to
case and whitespace, which the encoder would map to the same vector anyway) are dropped, counted and
logged; the first occurrence of a duplicate keeps its id and metadata (across files, in source order).
Both index build engines read through :func:`read_rows` and deduplicate with :func:`collect`.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transresnet.keys import text_key

logger = logging.getLogger(__name__)

CAPTION = "caption"
ID = "id"
PERSONALITY = "personality"
TEXT_SUFFIXES = (".txt",)
CSV_SUFFIXES = (".csv", ".tsv")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = (*TEXT_SUFFIXES, *CSV_SUFFIXES, *JSONL_SUFFIXES, *PARQUET_SUFFIXES)
PARQUET_BATCH_ROWS = 65_536
FORMAT_HELP = ("a caption file is .txt (one caption per line), .csv/.tsv with a header row holding a "
               "'caption' column, .jsonl with one object per line holding a 'caption' field, or .parquet with "
               "a 'caption' column; 'id', 'personality' and other columns are optional; a folder is read as "
               "all such files in it (sorted by path)")
Source = str | Path | Sequence[str | Path]
"""One caption file, a folder of them, or several of either (read in the order given)."""


@dataclass
class CaptionTable:
    """Deduplicated captions with their ids and metadata, row i = vector i = FAISS id i."""

    captions: list[str]
    ids: list[str]
    metadata: dict[str, list[str | None]] = field(default_factory=dict)
    """Column name -> one value per caption (``personality`` among them when the source has it)."""
    source: str = ""
    format: str = ""
    rows_read: int = 0
    dropped_empty: int = 0
    dropped_duplicate: int = 0

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def personalities(self) -> list[str | None] | None:
        return self.metadata.get(PERSONALITY)

    def report(self) -> dict[str, Any]:
        return {"path": self.source, "format": self.format, "rows": self.rows_read, "kept": len(self),
                "dropped_empty": self.dropped_empty, "dropped_duplicate": self.dropped_duplicate}


def _scalar(value: Any) -> str | None:
    """Metadata is stored as text; nested JSON values keep their JSON form."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)


def _read_text(path: Path, field: str = CAPTION, hint: str = FORMAT_HELP) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield {field: line.rstrip("\r\n")}


def _missing_column(path: Path, field: str, columns: list[str], hint: str) -> ValueError:
    return ValueError(f"{path} has no '{field}' column (columns: {', '.join(columns) or 'none'}); name the "
                      f"column '{field}'. {hint}")


def _read_csv(path: Path, field: str = CAPTION, hint: str = FORMAT_HELP) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        columns = [c.strip() for c in reader.fieldnames or []]
        if field not in columns:
            raise _missing_column(path, field, columns, hint)
        reader.fieldnames = columns
        for row in reader:
            row.pop(None, None)  # surplus fields of a ragged row
            yield row


def _read_jsonl(path: Path, field: str = CAPTION, hint: str = FORMAT_HELP) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number} is not valid JSON ({err.msg}); {hint}") from None
            if not isinstance(row, dict) or field not in row:
                raise ValueError(f"{path} line {number} has no '{field}' field; {hint}")
            yield row


def _read_parquet(path: Path, field: str = CAPTION, hint: str = FORMAT_HELP) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq  # only Parquet sources pay for it

    try:
        source = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for a non-Parquet file
        raise ValueError(f"{path} is not a readable Parquet file ({err}); {hint}") from None
    columns = source.schema_arrow.names
    if field not in columns:
        raise _missing_column(path, field, columns, hint)
    for batch in source.iter_batches(batch_size=PARQUET_BATCH_ROWS):  # bounded memory for large shards
        yield from batch.to_pylist()


READERS = {"text": _read_text, "csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}
"""Format -> row reader ``(path, field=CAPTION, hint=FORMAT_HELP)``: rows as dicts, each holding ``field``
(the caption; the id for `index remove`'s ids files), refused with ``hint`` when it is missing."""


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise ValueError(f"cannot tell the format of {path} from its suffix {suffix!r}; {FORMAT_HELP}")


def collect(rows: Iterable[dict[str, Any]], *, source: str = "", fmt: str = "") -> CaptionTable:
    """Drop empty and duplicate captions; keep ids (row number when absent) and metadata columns."""
    table = CaptionTable(captions=[], ids=[], source=source, format=fmt)
    seen: set[str] = set()
    columns: dict[str, list[str | None]] = {}
    for number, row in enumerate(rows):
        table.rows_read += 1
        text = _scalar(row.get(CAPTION)) or ""
        text = text.strip()
        if not text:
            table.dropped_empty += 1
            continue
        key = text_key(text)
        if key in seen:
            table.dropped_duplicate += 1
            continue
        seen.add(key)
        position = len(table.captions)
        table.captions.append(text)
        raw_id = _scalar(row.get(ID))
        table.ids.append(raw_id.strip() if raw_id and raw_id.strip() else str(number))
        for name, value in row.items():
            if name in (CAPTION, ID):
                continue
            # A column first seen late is back-filled with None for the rows before it.
            column = columns.setdefault(name, [None] * position)
            column.append(_scalar(value))
        for column in columns.values():
            if len(column) < position + 1:
                column.append(None)
    table.metadata = columns
    return table


def as_text_row(row: dict[str, Any]) -> dict[str, str | None]:
    """A source row with every value in the text form :func:`collect` stores (so it can travel as strings)."""
    return {name: _scalar(value) for name, value in row.items()}


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The raw rows of one caption file (the one parser of every format, for both build engines)."""
    return READERS[detect_format(path)](path)


def _folder_files(folder: Path) -> list[Path]:
    # Hidden files and Spark/Hadoop markers (_SUCCESS, .crc) are not captions.
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts))
    if not files:
        raise ValueError(f"folder {folder} holds no caption files ({', '.join(SUFFIXES)}); {FORMAT_HELP}")
    return files


def source_files(source: Source) -> list[Path]:
    """The caption files of ``source``, in reading order; a clear error for a missing path."""
    items = [source] if isinstance(source, (str, Path)) else list(source)
    if not items:
        raise ValueError(f"no caption source given; {FORMAT_HELP}")
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            files += _folder_files(item)
        elif item.is_file():
            detect_format(item)  # an unknown suffix fails before any reading
            files.append(item)
        else:
            raise FileNotFoundError(f"caption source {item} not found; {FORMAT_HELP}")
    return files


def describe_source(source: Source, files: Sequence[Path]) -> tuple[str, str]:
    """The manifest's ``source.path`` and ``source.format`` of a (possibly multi-file) source."""
    items = [source] if isinstance(source, (str, Path)) else list(source)
    formats = list(dict.fromkeys(detect_format(f) for f in files))
    return ", ".join(str(i) for i in items), "+".join(formats)


def checked(table: CaptionTable) -> CaptionTable:
    """Refuse a source with no captions; log what was dropped."""
    if not table.captions:
        raise ValueError(f"{table.source} holds no non-empty captions; {FORMAT_HELP}")
    if table.dropped_empty or table.dropped_duplicate:
        logger.warning("%s: dropped %d empty and %d duplicate captions of %d rows; %d kept", table.source,
                       table.dropped_empty, table.dropped_duplicate, table.rows_read, len(table))
    else:
        logger.info("%s: %d captions", table.source, len(table))
    return table


def read_captions(source: Source) -> CaptionTable:
    """Read caption files (one, several, or a folder of shards) into one deduplicated :class:`CaptionTable`;
    rows are numbered across files, so an id-less row's id is its position in the whole source."""
    files = source_files(source)
    label, fmt = describe_source(source, files)
    rows = (row for path in files for row in read_rows(path))
    return checked(collect(rows, source=label, fmt=fmt))
