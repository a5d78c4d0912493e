"""The versioned on-disk layout of a caption index, its manifest, atomic publishing and pruning.

Layout::

    INDEX_ROOT/
      CURRENT                         name of the version readers load (replaced atomically)
      versions/
        20250101T120000123456Z-1a2b3c/
          index.faiss                 the FAISS index (CPU form), FAISS id i = captions row i
          captions.arrow              row, id, caption, then metadata columns (personality, image, ...):
                                      an uncompressed Arrow IPC file, memory-mapped by readers
                                      (format 1 versions hold captions.parquet instead)
          manifest.json               fingerprint, dimension, count, index type and parameters, sha256s
          .staging-<version>@<host>@<pid>/ a build in progress (never read)

A version is written in a staging directory beside its final place, renamed into ``versions/`` (atomic
on one filesystem) and only then named in ``CURRENT`` (written to a temp file and ``os.replace``d), so a
reader sees either the old complete version or the new complete one, and an interrupted build leaves
the previous version current. Pruning deletes the oldest versions beyond ``keep``, never the current one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from transresnet.files import fsync_dir, fsync_file, make_readable, owner_is_gone, sha256_file, writer_is_gone

from .captions import CaptionTable

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Written by this version. 2: captions in an Arrow IPC file (memory-mapped: the text of a million captions
stays in the page cache, not in each process's heap); 1: captions in Parquet (still read)."""
READABLE_FORMATS = (1, 2)
CURRENT = "CURRENT"
VERSIONS = "versions"
INDEX_FILE = "index.faiss"
CAPTIONS_FILE = "captions.arrow"
LEGACY_CAPTIONS_FILE = "captions.parquet"
MANIFEST_FILE = "manifest.json"
STAGING_PREFIX = ".staging-"
POINTER_TEMP_PREFIX = f".{CURRENT}."
MAX_NAME_LENGTH = 255
ROW, ID, CAPTION = "row", "id", "caption"


class IndexLoadError(ValueError):
    """An index that cannot be served: missing, incomplete, corrupted, or built for another checkpoint.
    The message says what to rebuild; ``reason`` is a short form of it (for tables, logs and /readyz)."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


# ---------------------------------------------------------------------------------------- naming


def new_version_name() -> str:
    """UTC time to the microsecond (so names sort by age) plus a random suffix (so they never clash)."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z"
    return f"{stamp}-{secrets.token_hex(3)}"


def versions_dir(root: Path) -> Path:
    return Path(root) / VERSIONS


def list_versions(root: Path) -> list[str]:
    """Published versions, oldest first."""
    folder = versions_dir(root)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_current(root: Path) -> str | None:
    """The text of INDEX_ROOT/CURRENT (stripped), unchecked; None when there is no pointer."""
    try:
        name = (Path(root) / CURRENT).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise IndexLoadError(f"{Path(root) / CURRENT} cannot be read ({err}); run `transresnet index rollback "
                             f"{root}` to rewrite it", reason=f"{CURRENT} unreadable") from None
    return name or None


def version_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a version directory's name (a single plain path component), or None."""
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"is longer than {MAX_NAME_LENGTH} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains control characters"
    separators = {"/", "\\", os.sep, os.altsep or "/"}
    if any(sep in name for sep in separators) or Path(name).is_absolute():
        return "is a path, not a version name"
    if name in (".", ".."):
        return "is a relative directory reference"
    if name.startswith("."):
        return "names a hidden or staging directory"
    return None


def _rollback_hint(root: Path) -> str:
    return f"run `transresnet index rollback {root}` to point it at the newest verified version"


def stays_inside_versions(root: Path, name: str) -> bool:
    """Whether versions/``name`` resolves (symlinks followed) to a directory directly inside versions/."""
    folder = versions_dir(root)
    try:
        return (folder / name).resolve(strict=True).parent == folder.resolve(strict=True)
    except OSError:
        return False


def version_path(root: Path, name: str) -> Path:
    """INDEX_ROOT/versions/``name``, refused unless ``name`` is one plain component naming an existing
    directory whose resolved path stays inside versions/ (no absolute paths, ``..`` or escaping symlinks)."""
    root = Path(root)
    folder = versions_dir(root)
    problem = version_name_problem(name)
    if problem is not None:
        raise IndexLoadError(f"{root / CURRENT} holds {name!r}, which {problem}: {CURRENT} must hold the name of "
                             f"a version directory in {folder}; {_rollback_hint(root)}",
                             reason=f"{CURRENT} holds {name!r}, which {problem}")
    version = folder / name
    if not version.is_dir():
        available = ", ".join(list_versions(root)) or "none"
        raise IndexLoadError(f"{root / CURRENT} names version {name!r}, which is missing from {folder} "
                             f"(available: {available}); {_rollback_hint(root)}, or rebuild with "
                             f"`transresnet index build ... --out {root}`", reason=f"version {name!r} is missing")
    if not stays_inside_versions(root, name):
        raise IndexLoadError(f"{version} resolves outside {folder} (a symlink?); versions must be real "
                             f"directories in {folder}; {_rollback_hint(root)}",
                             reason=f"version {name!r} resolves outside {VERSIONS}/")
    return version


def is_version_dir(path: Path) -> bool:
    """A version directory (has a manifest, or sits in a versions/ folder) rather than an INDEX_ROOT."""
    path = Path(path)
    return (path / MANIFEST_FILE).is_file() or path.parent.name == VERSIONS


def resolve_version_dir(path: str | Path) -> Path:
    """INDEX_ROOT (-> its current version) or a version directory -> the version directory."""
    path = Path(path)
    if is_version_dir(path):
        return path
    current = read_current(path)
    if current is None:
        raise IndexLoadError(f"no caption index at {path} (no {CURRENT} file); build one with "
                             f"`transresnet index build --checkpoint CKPT --captions FILE --out {path}`",
                             reason=f"no {CURRENT} file")
    return version_path(path, current)


# ----------------------------------------------------------------------------------------- files


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def captions_arrow(table: CaptionTable) -> pa.Table:
    columns: dict[str, pa.Array] = {
        ROW: pa.array(range(len(table)), type=pa.int64()),
        ID: pa.array(table.ids, type=pa.string()),
        CAPTION: pa.array(table.captions, type=pa.string()),
    }
    for name, values in table.metadata.items():
        if name not in columns:
            columns[name] = pa.array(values, type=pa.string())
    return pa.table(columns)


def write_captions(path: Path, table: CaptionTable) -> None:
    """Uncompressed Arrow IPC, so readers map it without decoding (compressed buffers would be copied out)."""
    data = captions_arrow(table)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, data.schema) as writer:
        writer.write_table(data)


def captions_file(manifest: dict[str, Any]) -> str:
    """The caption file of a version of this manifest's format."""
    return LEGACY_CAPTIONS_FILE if manifest.get("format_version") == 1 else CAPTIONS_FILE


def read_captions_table(path: Path) -> pa.Table:
    """A version's captions: an Arrow IPC file is memory-mapped (zero copy; pages load as rows are read),
    a format-1 Parquet file is decoded into memory."""
    if path.suffix == ".parquet":
        return pq.read_table(path)
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    table.validate()  # buffer sizes against the row count (cheap: reads no text), so a bad file fails here
    return table


MANIFEST_KEYS: dict[str, type | tuple[type, ...]] = {"dim": int, "count": int, "checkpoint": dict, "index": dict,
                                                     "files": dict}
"""Manifest entries every reader relies on, and their JSON types."""


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def read_manifest(version_dir: Path) -> dict[str, Any]:
    path = version_dir / MANIFEST_FILE
    if not path.is_file():
        raise IndexLoadError(f"{version_dir} has no {MANIFEST_FILE}: it is not a complete index version; "
                             "rebuild it with `transresnet index build`", reason=f"{MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexLoadError(f"{path} is corrupted ({err}); rebuild with `transresnet index build`",
                             reason=f"{MANIFEST_FILE} is corrupted") from None
    if not isinstance(manifest, dict):
        raise IndexLoadError(f"{path} is corrupted (not a JSON object); rebuild with `transresnet index build`",
                             reason=f"{MANIFEST_FILE} is corrupted")
    if manifest.get("format_version") not in READABLE_FORMATS:
        readable = " and ".join(map(str, READABLE_FORMATS))
        raise IndexLoadError(f"{version_dir} has index format {manifest.get('format_version')}; this version "
                             f"reads formats {readable}: rebuild with `transresnet index build`",
                             reason=f"index format {manifest.get('format_version')!r}, not {readable}")
    problems = [key for key, kind in MANIFEST_KEYS.items() if not isinstance(manifest.get(key), kind)]
    if problems:
        raise IndexLoadError(f"{path} lacks or mangles {', '.join(problems)}: it is corrupted; rebuild with "
                             "`transresnet index build`", reason=f"{MANIFEST_FILE} lacks {', '.join(problems)}")
    return manifest


def verify_files(version_dir: Path, manifest: dict[str, Any], *, checksums: bool = True,
                 rebuild: str = "transresnet index build") -> None:
    """Every file the manifest lists is present, of its recorded size and (optionally) checksum."""
    files = manifest.get("files", {})
    for name in (INDEX_FILE, captions_file(manifest)):
        if name not in files:
            raise IndexLoadError(f"{version_dir / MANIFEST_FILE} does not list {name}: the manifest is incomplete; "
                                 f"rebuild it: {rebuild}", reason=f"{MANIFEST_FILE} does not list {name}")
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)):
            raise IndexLoadError(f"{version_dir / MANIFEST_FILE} records no size and sha256 for {name}: the "
                                 f"manifest is corrupted; rebuild it: {rebuild}",
                                 reason=f"{MANIFEST_FILE} entry for {name} is corrupted")
        path = version_dir / name
        if not path.is_file():
            raise IndexLoadError(f"index version {version_dir} is missing {name}; rebuild it: {rebuild}",
                                 reason=f"{name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IndexLoadError(f"{path} is truncated or altered ({size} bytes, the manifest records "
                                 f"{entry['bytes']}); rebuild it: {rebuild}",
                                 reason=f"{name} is truncated or altered ({size} of {entry['bytes']} bytes)")
        if checksums and sha256_file(path) != entry["sha256"]:
            raise IndexLoadError(f"{path} is corrupted (sha256 differs from the manifest); rebuild it: {rebuild}",
                                 reason=f"{name} checksum mismatch")


# -------------------------------------------------------------------------------------- publish


def new_staging_dir(root: Path, version: str) -> Path:
    folder = versions_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f"{STAGING_PREFIX}{version}@{socket.gethostname()}@{os.getpid()}"
    staging.mkdir()
    return staging


def pointer_temp_name() -> str:
    """``.CURRENT.<host>.<pid>.<hex>``: the temp file a pointer is written to before it replaces CURRENT."""
    return f"{POINTER_TEMP_PREFIX}{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"


def set_current(root: Path, version: str) -> None:
    """Point CURRENT at ``version`` atomically (temp file, fsync, os.replace): a reader sees the old
    pointer or the new one, never a partial file. ``version`` must be an existing version's plain name."""
    root = Path(root)
    problem = version_name_problem(version)
    if problem is not None or not (versions_dir(root) / version).is_dir():
        why = f"{problem}" if problem else f"does not exist in {versions_dir(root)}"
        raise ValueError(f"version {version!r} {why}; available: {', '.join(list_versions(root)) or 'none'}")
    version_path(root, version)  # refuses a symlink escaping versions/
    temp = root / pointer_temp_name()
    try:
        temp.write_text(version + "\n", encoding="utf-8")
        fsync_file(temp)
        os.replace(temp, root / CURRENT)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(root)


def publish(staging: Path, root: Path, version: str) -> Path:
    """Make a fully written staging directory the current version (readable by other users, like any
    tool's output: a server in a container may run as another user)."""
    make_readable(staging)
    for path in staging.iterdir():
        fsync_file(path)
    fsync_dir(staging)
    final = versions_dir(root) / version
    os.rename(staging, final)  # atomic; fails rather than overwrite if the name exists
    fsync_dir(versions_dir(root))
    set_current(root, version)
    logger.info("published index version %s (now current in %s)", version, root)
    return final


def _staging_is_stale(path: Path) -> bool:
    """A staging directory whose build process (on this host) is gone."""
    return owner_is_gone(path)


def _pointer_temp_is_stale(path: Path) -> bool:
    """A ``.CURRENT.<host>.<pid>.<hex>`` (or older ``.CURRENT.<pid>.<hex>``) file whose writer is gone."""
    parts = path.name[len(POINTER_TEMP_PREFIX):].rsplit(".", 2)
    if len(parts) == 2:  # written before the host was part of the name: by this host
        parts = [socket.gethostname(), *parts]
    return len(parts) == 3 and writer_is_gone(parts[0], parts[1])


def remove_leftovers(root: Path) -> list[str]:
    """Delete staging directories and temp pointer files left by builds and pointer writes that died."""
    root = Path(root)
    removed: list[str] = []
    folder = versions_dir(root)
    stale_dirs = [p for p in folder.glob(f"{STAGING_PREFIX}*") if p.is_dir() and _staging_is_stale(p)] \
        if folder.is_dir() else []
    for stale in stale_dirs:
        logger.info("removing %s left by an interrupted build", stale.name)
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale.name)
    for temp in root.glob(f"{POINTER_TEMP_PREFIX}*") if root.is_dir() else []:
        if temp.is_file() and not temp.is_symlink() and _pointer_temp_is_stale(temp):
            logger.info("removing %s left by an interrupted pointer update", temp.name)
            temp.unlink(missing_ok=True)
            removed.append(temp.name)
    return removed


def prune(root: Path, keep: int) -> list[str]:
    """Delete the oldest versions beyond ``keep`` (never the current one), dead builds' staging dirs and
    dead writers' temp pointer files; returns the deleted versions."""
    if keep < 1:
        raise ValueError(f"--keep must be at least 1 (the current version), got {keep}")
    root = Path(root)
    current = read_current(root)
    versions = list_versions(root)
    doomed = [v for v in versions if v != current][: max(0, len(versions) - keep)]
    for name in doomed:
        shutil.rmtree(versions_dir(root) / name, ignore_errors=True)
    remove_leftovers(root)
    if doomed:
        logger.info("pruned %d old index version(s): %s", len(doomed), ", ".join(doomed))
    return doomed
