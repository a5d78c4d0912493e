"""What the ONNX Runtime exports of a checkpoint share: where they are cached, how they are keyed, published
and verified, and how their sessions are opened.

Used by the int8 caption encoder (:mod:`transresnet.onnx_text`) and the image encoder runtimes
(:mod:`transresnet.image_runtime`). An export lives in one folder per key (a fingerprint of the weights it
was made from, the recipe and the torch / onnx / onnxruntime versions), in this order of places: the
``cache_dir`` argument, ``$TRANSRESNET_ENCODER_CACHE``, ``<checkpoint>/encoders/`` when the checkpoint
folder is writable, else ``$XDG_CACHE_HOME/transresnet/encoders`` (``~/.cache``). A folder is built in a
staging folder and published in one rename (:func:`transresnet.checkpoint.publish_dir`); at load its
``meta.json`` must name the same key and the model file's sha256, or it is exported again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from transresnet.checkpoint import META, clean_leftovers, publish_dir, staging_dir
from transresnet.files import sha256_file, write_text_atomic
from transresnet.runtime import utc_timestamp

logger = logging.getLogger(__name__)

CACHE_ENV = "TRANSRESNET_ENCODER_CACHE"
INSTALL_HINT = 'pip install "transresnet[onnx]" (onnxruntime and onnx)'
PACKAGES = ("onnxruntime", "onnx")


class OnnxUnavailable(ImportError):
    """An ONNX Runtime path was asked for but the onnx extra is not installed."""


def missing_packages() -> list[str]:
    """The packages of the onnx extra that cannot be imported here."""
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def runtime_versions(what: str = "this encoder", alternative: str = "") -> dict[str, str]:
    """The versions an export depends on (part of every cache key); OnnxUnavailable without the extra."""
    missing = missing_packages()
    if missing:
        tail = f"; or {alternative}" if alternative else ""
        raise OnnxUnavailable(f"{what} needs {' and '.join(missing)}: {INSTALL_HINT}{tail}")
    return {"torch": torch.__version__, "onnx": importlib.metadata.version("onnx"),
            "onnxruntime": importlib.metadata.version("onnxruntime")}


def cache_root(checkpoint: Path | None, cache_dir: str | Path | None = None) -> Path:
    """Where exports of the checkpoint in folder ``checkpoint`` live (see the module doc for the order)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if checkpoint is not None and (checkpoint / META).is_file() and os.access(checkpoint, os.W_OK):
        return checkpoint / "encoders"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "transresnet" / "encoders"


def keyed_folder(root: Path, prefix: str, key: dict[str, Any]) -> Path:
    """``root/<prefix>-<fingerprint[:16]>-<hash of the whole key>``: a new key is a new folder."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return root / f"{prefix}-{str(key['fingerprint'])[:16]}-{digest}"


def read_verified(folder: Path, key: dict[str, Any], model_file: str) -> dict[str, Any] | None:
    """The meta of a complete, intact export for ``key`` in ``folder``; None (reason logged) otherwise."""
    if not (folder / META).is_file():
        return None
    try:
        meta = json.loads((folder / META).read_text())
        if meta.get("key") != key:
            raise ValueError("it was exported for another key")
        if sha256_file(folder / model_file) != meta.get("sha256"):
            raise ValueError(f"{model_file} does not match its recorded sha256")
        return meta
    except Exception as err:  # noqa: BLE001 - any unreadable cache entry is rebuilt, never served
        logger.warning("cached export %s is unusable (%s); exporting it again", folder, err)
        return None


def publish_export(folder: Path, key: dict[str, Any], model_file: str,
                   build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run ``build(staging)`` (it writes ``model_file`` there and returns extra meta), record the key and
    the file's sha256, and publish the folder in one step. Returns the meta written."""
    clean_leftovers(folder)
    staging = staging_dir(folder)
    try:
        extra = build(staging)
        meta = {"key": key, **extra, "sha256": sha256_file(staging / model_file), "created": utc_timestamp()}
        write_text_atomic(staging / META, json.dumps(meta, indent=1))
        publish_dir(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


def open_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session on ``threads`` intra-op threads that do not spin when idle."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Same reason as OMP_WAIT_POLICY=PASSIVE (transresnet.runtime): spinning idle threads steal shared cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def memo_key(folder: Path, files: tuple[str, ...], threads: int) -> tuple | None:
    """A loaded session is reused while its files are the ones it was loaded from (a rewrite changes a stat)."""
    try:
        stats = [(folder / name).stat() for name in files]
    except FileNotFoundError:
        return None
    return str(folder), threads, *((stat.st_mtime_ns, stat.st_size) for stat in stats)


class SessionMemo:
    """A few loaded sessions (or runners around them), keyed by :func:`memo_key`; the oldest goes first."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: dict[tuple, Any] = {}

    def get(self, key: tuple | None) -> Any:
        return None if key is None else self._items.get(key)

    def put(self, key: tuple | None, value: Any) -> None:
        if key is None:
            return
        if len(self._items) >= self.size:
            self._items.pop(next(iter(self._items)))
        self._items[key] = value


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantiser logs a line per tensor on the root logger (and advice about pre-processing
    the exports already had): keep those out of the user's log."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def timed(label: str, started: float, folder: Path) -> None:
    logger.info("exported %s to %s in %.1fs", label, folder, time.perf_counter() - started)
