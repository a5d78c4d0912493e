"""The versioned on-disk layout of a caption index, its manifest, atomic publishing and pruning.

Layout::

    INDEX_ROOT/
      CURRENT                         name of the version readers load (replaced atomically)
      versions/
        20250101T120000123456Z-1a2b3c/
          index.faiss                 the FAISS index (CPU form), FAISS id i = captions row i
          captions.parquet            row, id, caption, then metadata columns (personality, image, ...)
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

from transresnet.files import sha256_file

from .captions import CaptionTable

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CURRENT = "CURRENT"
VERSIONS = "versions"
INDEX_FILE = "index.faiss"
CAPTIONS_FILE = "captions.parquet"
MANIFEST_FILE = "manifest.json"
STAGING_PREFIX = ".staging-"
ROW, ID, CAPTION = "row", "id", "caption"


class IndexLoadError(ValueError):
    """An index that cannot be served: missing, incomplete, corrupted, or built for another checkpoint.
    The message says what to rebuild."""


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
    try:
        name = (Path(root) / CURRENT).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return name or None


def resolve_version_dir(path: str | Path) -> Path:
    """INDEX_ROOT (-> its current version) or a version directory -> the version directory."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file() or path.parent.name == VERSIONS:
        return path
    current = read_current(path)
    if current is None:
        raise IndexLoadError(f"no caption index at {path} (no {CURRENT} file); build one with "
                             f"`transresnet index build --checkpoint CKPT --captions FILE --out {path}`")
    version = versions_dir(path) / current
    if not version.is_dir():
        raise IndexLoadError(f"{path}/{CURRENT} names version {current}, which is missing from "
                             f"{versions_dir(path)}; rebuild with `transresnet index build ... --out {path}`")
    return version


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
    pq.write_table(captions_arrow(table), path, compression="zstd")


def read_captions_table(path: Path, *, memory_map: bool = False) -> pa.Table:
    return pq.read_table(path, memory_map=memory_map)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def read_manifest(version_dir: Path) -> dict[str, Any]:
    path = version_dir / MANIFEST_FILE
    if not path.is_file():
        raise IndexLoadError(f"{version_dir} has no {MANIFEST_FILE}: it is not a complete index version; "
                             "rebuild it with `transresnet index build`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexLoadError(f"{path} is corrupted ({err}); rebuild with `transresnet index build`") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexLoadError(f"{version_dir} has index format {manifest.get('format_version')}; this version "
                             f"reads format {FORMAT_VERSION}: rebuild with `transresnet index build`")
    return manifest


def verify_files(version_dir: Path, manifest: dict[str, Any], *, checksums: bool = True,
                 rebuild: str = "transresnet index build") -> None:
    """Every file the manifest lists is present, of its recorded size and (optionally) checksum."""
    for name, entry in manifest.get("files", {}).items():
        path = version_dir / name
        if not path.is_file():
            raise IndexLoadError(f"index version {version_dir} is missing {name}; rebuild it: {rebuild}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IndexLoadError(f"{path} is truncated or altered ({size} bytes, the manifest records "
                                 f"{entry['bytes']}); rebuild it: {rebuild}")
        if checksums and sha256_file(path) != entry["sha256"]:
            raise IndexLoadError(f"{path} is corrupted (sha256 differs from the manifest); rebuild it: {rebuild}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not every platform lets a directory be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------------- publish


def new_staging_dir(root: Path, version: str) -> Path:
    folder = versions_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f"{STAGING_PREFIX}{version}@{socket.gethostname()}@{os.getpid()}"
    staging.mkdir()
    return staging


def set_current(root: Path, version: str) -> None:
    """Point CURRENT at ``version`` atomically (temp file, fsync, os.replace)."""
    root = Path(root)
    if not (versions_dir(root) / version).is_dir():
        raise ValueError(f"version {version} does not exist in {versions_dir(root)}; "
                         f"available: {', '.join(list_versions(root)) or 'none'}")
    temp = root / f".{CURRENT}.{os.getpid()}.{secrets.token_hex(3)}"
    temp.write_text(version + "\n", encoding="utf-8")
    _fsync_file(temp)
    os.replace(temp, root / CURRENT)
    _fsync_dir(root)


def publish(staging: Path, root: Path, version: str) -> Path:
    """Make a fully written staging directory the current version."""
    for path in staging.iterdir():
        _fsync_file(path)
    _fsync_dir(staging)
    final = versions_dir(root) / version
    os.rename(staging, final)  # atomic; fails rather than overwrite if the name exists
    _fsync_dir(versions_dir(root))
    set_current(root, version)
    logger.info("published index version %s (now current in %s)", version, root)
    return final


def _staging_is_stale(path: Path) -> bool:
    """A staging directory whose build process (on this host) is gone."""
    host_pid = path.name.rsplit("@", 2)
    if len(host_pid) != 3 or not host_pid[2].isdigit():
        return False
    host, pid = host_pid[1], int(host_pid[2])
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def prune(root: Path, keep: int) -> list[str]:
    """Delete the oldest versions beyond ``keep`` (never the current one) and dead builds' staging dirs."""
    if keep < 1:
        raise ValueError(f"--keep must be at least 1 (the current version), got {keep}")
    root = Path(root)
    current = read_current(root)
    versions = list_versions(root)
    doomed = [v for v in versions if v != current][: max(0, len(versions) - keep)]
    for name in doomed:
        shutil.rmtree(versions_dir(root) / name, ignore_errors=True)
    folder = versions_dir(root)
    for stale in (p for p in folder.glob(f"{STAGING_PREFIX}*") if p.is_dir() and _staging_is_stale(p)):
        logger.info("removing %s left by an interrupted build", stale.name)
        shutil.rmtree(stale, ignore_errors=True)
    if doomed:
        logger.info("pruned %d old index version(s): %s", len(doomed), ", ".join(doomed))
    return doomed
