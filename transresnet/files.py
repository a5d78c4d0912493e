"""File helpers without heavy imports (index readers use them without loading torch): checksums, modes,
and the atomic steps that checkpoints, training states and index versions are published with."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

logger = logging.getLogger(__name__)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain file write would (0644 / 0755 under the usual
    umask 022): writers that go through temporary files (safetensors, tempfile) leave 0600, which a service
    running as another user, e.g. in a container, cannot read."""
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


# ------------------------------------------------------------------------------- atomic file steps


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (renames into it); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and then every directory, deepest first."""
    dirs = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_file(path)
        elif path.is_dir():
            dirs.append(path)
    for directory in reversed(dirs):
        fsync_dir(directory)


def owner_tag() -> str:
    """``@host@pid``: names a temporary file or folder after the process writing it."""
    return f"@{socket.gethostname()}@{os.getpid()}"


def writer_is_gone(host: str, pid_text: str) -> bool:
    """True when process ``pid_text`` on ``host`` no longer runs (only this host's processes can be asked)."""
    if not pid_text.isdigit() or host != socket.gethostname() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def owner_is_gone(path: Path) -> bool:
    """True for a ``...@host@pid`` leftover whose writer (on this host) no longer runs."""
    parts = path.name.rsplit("@", 2)
    return len(parts) == 3 and writer_is_gone(parts[1], parts[2])


def remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Delete ``prefix*`` entries of ``folder`` left by processes that died while writing them."""
    removed = []
    for path in sorted(folder.glob(f"{prefix}*")) if folder.is_dir() else []:
        if owner_is_gone(path):
            logger.warning("removing %s, left by an interrupted writer", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_output(path: Path, *, newline: str | None = None) -> Iterator[TextIO]:
    """A text handle whose content replaces ``path`` in one step when the block ends (temp file beside it
    named after its writer, fsync, ``os.replace``, fsync of the folder); on an error ``path`` is untouched."""
    temp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(3)}{owner_tag()}")
    try:
        with open(temp, "w", encoding="utf-8", newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step (see :func:`atomic_output`)."""
    with atomic_output(path) as handle:
        handle.write(text)
