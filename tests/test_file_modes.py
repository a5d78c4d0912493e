"""Checkpoints, training states and index versions are written world-readable, like other tools' output."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import build_test_index
from transresnet.checkpoint import Checkpoint, save_checkpoint


@pytest.fixture
def usual_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _modes(folder: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [folder, *folder.rglob("*")]}


def test_a_checkpoint_is_readable_by_other_users(usual_umask: None, tiny_checkpoint: Checkpoint,
                                                 tmp_path: Path) -> None:
    folder = save_checkpoint(tiny_checkpoint.model, tiny_checkpoint.config, tmp_path / "best")
    assert _modes(folder) == {("dir", 0o755), ("file", 0o644)}


def test_an_index_version_is_readable_by_other_users(usual_umask: None, tiny_checkpoint: Checkpoint,
                                                     tmp_path: Path) -> None:
    version = build_test_index(tiny_checkpoint, tmp_path / "index")
    assert _modes(version) == {("dir", 0o755), ("file", 0o644)}
    assert stat.S_IMODE((tmp_path / "index" / "CURRENT").stat().st_mode) == 0o644
