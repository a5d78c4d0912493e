"""File helpers without heavy imports (index readers use them without loading torch)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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
