"""Dataset readers: caption CSVs, ParlAI Personality-Captions JSON and Karpathy ``dataset.json``.

Every reader turns a file into a :class:`Dataset` of :class:`CaptionRecord`s. Records that cannot be
used (image file missing, empty caption, a malformed entry) are skipped, counted per reason in a
:class:`SkipReport` and logged once; a file that is malformed as a whole raises ``ValueError`` saying
what is wrong and which format was expected.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMATS = ("auto", "csv", "personality_captions", "karpathy")
"""Accepted values of ``load_dataset(fmt=...)``."""

NO_PERSONALITY_SPLIT = "test"
"""Split given to Personality-Captions records when neither the argument nor the file name names one."""

KNOWN_SPLITS = ("train", "val", "test")

# Skip reasons (keys of SkipReport.counts).
MISSING_IMAGE = "missing image"
EMPTY_CAPTION = "empty caption"
MALFORMED_RECORD = "malformed record"

CSV_FORMAT_HELP = (
    "expected a CSV file with a header row 'image,split,caption[,personality]' "
    "(e.g. ../shared/data/flickr8k-1k/captions.csv)"
)
PC_FORMAT_HELP = (
    "expected a ParlAI Personality-Captions JSON file: a list of objects with 'image_hash', "
    "'personality', 'comment' and optionally 'candidates', '500_candidates', 'additional_comments'"
)
KARPATHY_FORMAT_HELP = (
    "expected a Karpathy dataset.json: an object with 'images', a list of objects with "
    "'filename', optional 'filepath', 'split' and 'sentences' (a list of objects with 'raw')"
)


@dataclass(frozen=True)
class CaptionRecord:
    """One (image, caption, personality) example."""

    image_id: str  # image file name relative to the image folder, e.g. "1000268201_693b08cb0e.jpg"
    image_path: Path  # absolute path of the image file
    caption: str  # stripped, non-empty
    personality: str | None  # trait as written in the data; None = no personality
    split: str  # "train" | "val" | "test" | ...
    candidates: tuple[str, ...] | None = None  # Personality-Captions test candidates (100, one gold)
    candidates_500: tuple[str, ...] | None = None  # the 500-candidate list (5 golds)
    additional_captions: tuple[str, ...] = ()  # extra gold captions ("additional_comments")


@dataclass
class SkipReport:
    """Skipped records: a count and the first few examples per reason."""

    max_examples: int = 3  # examples kept per reason
    counts: dict[str, int] = field(default_factory=dict)  # reason -> number of skipped records
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first details

    def add(self, reason: str, detail: str) -> None:
        """Count one skipped record; keep ``detail`` if it is among the first of its reason."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < self.max_examples:
            kept.append(detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0

    def summary(self) -> str:
        """One line: counts per reason with their first examples."""
        parts = []
        for reason, count in sorted(self.counts.items()):
            examples = "; ".join(self.examples.get(reason, []))
            parts.append(f"{count} x {reason} (e.g. {examples})")
        return ", ".join(parts)

    def log(self, log: logging.Logger | logging.LoggerAdapter, source: str | Path | None = None) -> None:
        """Emit one warning summarising the skipped records; nothing when none was skipped."""
        if not self:
            return
        where = f" from {source}" if source is not None else ""
        log.warning("skipped %d record(s)%s: %s", self.total, where, self.summary())


@dataclass
class Dataset:
    """The usable records of one file, where they came from and what was skipped."""

    records: list[CaptionRecord]
    source: Path
    skipped: SkipReport

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[CaptionRecord]:
        return iter(self.records)

    def image_ids(self) -> list[str]:
        """Distinct image ids in first-seen order."""
        return list(dict.fromkeys(r.image_id for r in self.records))

    def personalities(self) -> list[str]:
        """Distinct non-empty personalities in first-seen order."""
        return list(dict.fromkeys(r.personality for r in self.records if r.personality is not None))

    def splits(self) -> list[str]:
        """Distinct splits in first-seen order."""
        return list(dict.fromkeys(r.split for r in self.records))


@dataclass(frozen=True)
class _RawRecord:
    """A record as read from the file, before the image and caption checks."""

    image_id: str
    caption: str
    personality: str | None
    split: str
    candidates: tuple[str, ...] | None = None
    candidates_500: tuple[str, ...] | None = None
    additional_captions: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def load_dataset(
    path: str | Path,
    *,
    split: str | None = None,
    image_dir: str | Path | None = None,
    fmt: str = "auto",
    require_images: bool = True,
) -> Dataset:
    """Read a caption dataset.

    Args:
        path: a CSV (``image,split,caption[,personality]``), a Personality-Captions JSON list, or a
            Karpathy ``dataset.json``.
        split: for CSV and Karpathy files, keep only records of this split (``restval`` counts as
            ``train``); for Personality-Captions files, the split the records belong to (default: the
            file name stem when it is train/val/test, else ``"test"``).
        image_dir: folder the image ids are relative to. Default: ``images/`` beside a CSV or
            Personality-Captions file, the folder of a Karpathy ``dataset.json``.
        fmt: ``"auto"`` (by extension and content), ``"csv"``, ``"personality_captions"`` or
            ``"karpathy"``.
        require_images: skip records whose image file does not exist (the default). Set ``False`` to
            read captions alone, e.g. a candidate pool without photos.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown ``fmt``, a file malformed as a whole, or a ``split`` filter that matches
            no record.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass the dataset file itself (a .csv or .json file)")
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")

    fmt, payload = _resolve_format(path, fmt)
    if fmt == "csv":
        raw = _read_csv(path)
        default_dir = path.parent / "images"
    elif fmt == "personality_captions":
        raw = _read_personality_captions(payload, _pc_split(path, split))
        default_dir = path.parent / "images"
    else:
        raw = _read_karpathy(payload)
        default_dir = path.parent

    skipped = SkipReport()
    raw_records = list(_tally_malformed(raw, skipped))
    if split is not None and fmt != "personality_captions":
        raw_records = _filter_split(raw_records, split, path)
    root = Path(image_dir) if image_dir is not None else default_dir
    records = _validate(raw_records, root.resolve(), skipped, require_images)
    skipped.log(logger, path)
    logger.info("loaded %d record(s) of %d image(s) from %s (%s)", len(records),
                len({r.image_id for r in records}), path, fmt)
    return Dataset(records=records, source=path.resolve(), skipped=skipped)


# --------------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------------


def _resolve_format(path: Path, fmt: str) -> tuple[str, Any]:
    """Decide the format; for JSON formats also return the parsed document."""
    suffix = path.suffix.lower()
    if fmt == "csv" or (fmt == "auto" and suffix in (".csv", ".tsv")):
        return "csv", None
    document = _load_json(path, fmt)
    if fmt == "auto":
        fmt = _detect_json_format(path, document)
    return fmt, document


def _load_json(path: Path, fmt: str) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        expected = {
            "personality_captions": PC_FORMAT_HELP,
            "karpathy": KARPATHY_FORMAT_HELP,
        }.get(fmt, f"expected JSON ({PC_FORMAT_HELP}; or {KARPATHY_FORMAT_HELP}) or a .csv file")
        raise ValueError(f"{path} is not valid JSON ({exc}); {expected}") from exc


def _detect_json_format(path: Path, document: Any) -> str:
    if isinstance(document, dict) and "images" in document:
        return "karpathy"
    if isinstance(document, list):
        return "personality_captions"
    raise ValueError(
        f"cannot tell the format of {path}: its JSON top level is a {type(document).__name__}"
        f"{' without an images key' if isinstance(document, dict) else ''}; "
        f"{PC_FORMAT_HELP}; or {KARPATHY_FORMAT_HELP}"
    )


# --------------------------------------------------------------------------------------------------
# Readers: each yields _RawRecord, or (reason, detail) for an entry it cannot read
# --------------------------------------------------------------------------------------------------

_Raw = Iterable["_RawRecord | tuple[str, str]"]


def _read_csv(path: Path) -> list[_RawRecord | tuple[str, str]]:
    dialect: type[csv.Dialect] = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, dialect=dialect)
            columns = [c.strip().lower() for c in (reader.fieldnames or [])]
            missing = [c for c in ("image", "caption") if c not in columns]
            if missing:
                found = ",".join(reader.fieldnames or []) or "nothing"
                raise ValueError(
                    f"{path} lacks the column(s) {', '.join(missing)} (header: {found!r}); {CSV_FORMAT_HELP}"
                )
            reader.fieldnames = columns
            return [_csv_row(row, f"{path.name}:{reader.line_num}") for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path} is not a readable UTF-8 CSV file ({exc}); {CSV_FORMAT_HELP}") from exc


def _csv_row(row: dict[str | None, Any], where: str) -> _RawRecord | tuple[str, str]:
    if None in row:  # more cells than header columns
        return MALFORMED_RECORD, f"{where}: more cells than header columns"
    image = (row.get("image") or "").strip()
    personality = (row.get("personality") or "").strip() or None
    split = (row.get("split") or "").strip() or "all"
    return _RawRecord(image_id=image, caption=(row.get("caption") or "").strip(),
                      personality=personality, split=split)


def _pc_split(path: Path, split: str | None) -> str:
    if split is not None:
        return split
    stem = path.stem.lower()
    return stem if stem in KNOWN_SPLITS else NO_PERSONALITY_SPLIT


def _read_personality_captions(document: Any, split: str) -> list[_RawRecord | tuple[str, str]]:
    if not isinstance(document, list):
        raise ValueError(
            f"Personality-Captions JSON must be a list of records, got a {type(document).__name__}; "
            f"{PC_FORMAT_HELP}"
        )
    return [_pc_entry(entry, f"record {i}", split) for i, entry in enumerate(document)]


def _pc_entry(entry: Any, where: str, split: str) -> _RawRecord | tuple[str, str]:
    if not isinstance(entry, dict):
        return MALFORMED_RECORD, f"{where}: not an object"
    image_hash = entry.get("image_hash")
    if not isinstance(image_hash, str) or not image_hash.strip():
        return MALFORMED_RECORD, f"{where}: no image_hash"
    try:
        candidates = _optional_strings(entry.get("candidates"), "candidates")
        candidates_500 = _optional_strings(entry.get("500_candidates"), "500_candidates")
        additional = _optional_strings(entry.get("additional_comments"), "additional_comments") or ()
    except TypeError as exc:
        return MALFORMED_RECORD, f"{where} ({image_hash}): {exc}"
    comment = entry.get("comment")
    personality = entry.get("personality")
    personality = (personality.strip() or None) if isinstance(personality, str) else None
    return _RawRecord(
        image_id=f"{image_hash.strip()}.jpg",
        caption=comment.strip() if isinstance(comment, str) else "",
        personality=personality,
        split=split,
        candidates=candidates,
        candidates_500=candidates_500,
        additional_captions=tuple(a.strip() for a in additional if a.strip()),
    )


def _optional_strings(value: Any, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} is not a list of strings")
    return tuple(v.strip() for v in value)


def _read_karpathy(document: Any) -> list[_RawRecord | tuple[str, str]]:
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"Karpathy JSON has no 'images' list; {KARPATHY_FORMAT_HELP}")
    out: list[_RawRecord | tuple[str, str]] = []
    for i, entry in enumerate(images):
        out.extend(_karpathy_entry(entry, f"image {i}"))
    return out


def _karpathy_entry(entry: Any, where: str) -> list[_RawRecord | tuple[str, str]]:
    if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
        return [(MALFORMED_RECORD, f"{where}: no filename")]
    sentences = entry.get("sentences")
    if not isinstance(sentences, list):
        return [(MALFORMED_RECORD, f"{where} ({entry['filename']}): no sentences list")]
    filepath = entry.get("filepath")
    image_id = f"{filepath.strip('/')}/{entry['filename']}" if filepath else entry["filename"]
    split = str(entry.get("split") or "all")
    split = "train" if split == "restval" else split
    out: list[_RawRecord | tuple[str, str]] = []
    for sentence in sentences:
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        out.append(_RawRecord(image_id=image_id, caption=raw.strip() if isinstance(raw, str) else "",
                              personality=None, split=split))
    return out


# --------------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------------


def _tally_malformed(raw: _Raw, skipped: SkipReport) -> Iterator[_RawRecord]:
    for item in raw:
        if isinstance(item, tuple):
            skipped.add(*item)
        else:
            yield item


def _filter_split(raw: list[_RawRecord], split: str, path: Path) -> list[_RawRecord]:
    kept = [r for r in raw if r.split == split]
    if raw and not kept:
        present = ", ".join(sorted({r.split for r in raw}))
        raise ValueError(f"{path} has no record of split {split!r}; splits present: {present}")
    return kept


def _validate(raw: list[_RawRecord], root: Path, skipped: SkipReport, require_images: bool) -> list[CaptionRecord]:
    exists = _cached_is_file()
    records = []
    for r in raw:
        path = root / r.image_id
        if not r.image_id or (require_images and not exists(path)):
            skipped.add(MISSING_IMAGE, str(path) if r.image_id else "empty image field")
        elif not r.caption:
            skipped.add(EMPTY_CAPTION, r.image_id)
        else:
            records.append(CaptionRecord(
                image_id=r.image_id, image_path=path, caption=r.caption, personality=r.personality,
                split=r.split, candidates=r.candidates, candidates_500=r.candidates_500,
                additional_captions=r.additional_captions,
            ))
    return records


def _cached_is_file() -> Callable[[Path], bool]:
    """``Path.is_file`` memoised per path (an image has several captions)."""
    seen: dict[Path, bool] = {}

    def is_file(path: Path) -> bool:
        if path not in seen:
            seen[path] = path.is_file()
        return seen[path]

    return is_file
