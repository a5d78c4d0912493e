"""Candidate-caption sources: a text file (one caption per line), CSV, or JSONL.

CSV and JSONL rows need a ``caption`` field and may carry ``id``, ``personality`` and any other metadata
columns, which travel with the caption into the index. Empty captions and duplicates (same text up to
case and whitespace, which the encoder would map to the same vector anyway) are dropped, counted and
logged; the first occurrence of a duplicate keeps its id and metadata.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator
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
FORMAT_HELP = ("a caption file is .txt (one caption per line), .csv/.tsv with a header row holding a "
               "'caption' column, or .jsonl with one object per line holding a 'caption' field; "
               "'id', 'personality' and other columns are optional")


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


def _read_text(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield {CAPTION: line.rstrip("\r\n")}


def _read_csv(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        columns = [c.strip() for c in reader.fieldnames or []]
        if CAPTION not in columns:
            raise ValueError(f"{path} has no '{CAPTION}' column (columns: {', '.join(columns) or 'none'}); "
                             f"rename the caption column to '{CAPTION}'. {FORMAT_HELP}")
        reader.fieldnames = columns
        for row in reader:
            row.pop(None, None)  # surplus fields of a ragged row
            yield row


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number} is not valid JSON ({err.msg}); {FORMAT_HELP}") from None
            if not isinstance(row, dict) or CAPTION not in row:
                raise ValueError(f"{path} line {number} has no '{CAPTION}' field; {FORMAT_HELP}")
            yield row


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
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


def read_captions(path: str | Path) -> CaptionTable:
    """Read a caption source file into a deduplicated :class:`CaptionTable`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} not found; {FORMAT_HELP}")
    fmt = detect_format(path)
    reader = {"text": _read_text, "csv": _read_csv, "jsonl": _read_jsonl}[fmt]
    table = collect(reader(path), source=str(path), fmt=fmt)
    if not table.captions:
        raise ValueError(f"{path} holds no non-empty captions; {FORMAT_HELP}")
    if table.dropped_empty or table.dropped_duplicate:
        logger.warning("%s: dropped %d empty and %d duplicate captions of %d rows; %d kept", path,
                       table.dropped_empty, table.dropped_duplicate, table.rows_read, len(table))
    else:
        logger.info("%s: %d captions", path, len(table))
    return table
