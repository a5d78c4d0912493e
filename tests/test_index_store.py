"""The on-disk index: manifest checks, corrupted files, atomic publishing, interrupted builds, pruning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from transresnet.index import store
from transresnet.index.build import BuildOptions, write_version
from transresnet.index.captions import CaptionTable
from transresnet.index.search import load_index
from transresnet.index.store import IndexLoadError

from transresnet.checkpoint import Checkpoint

REPO = Path(__file__).resolve().parents[1]
FINGERPRINT = "a" * 32


def tiny_version(root: Path, n: int = 40, dim: int = 16, seed: int = 0, keep: int = 3,
                 fingerprint: str = FINGERPRINT) -> Path:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    table = CaptionTable(captions=[f"caption {seed} {i}" for i in range(n)], ids=[str(i) for i in range(n)],
                         source="/data/captions.csv", format="csv", rows_read=n)
    info = {"path": "/old/ckpt", "fingerprint": fingerprint, "embed_dim": dim, "scoring": "dot", "text_encoder": {}}
    return write_version(root, vectors=vectors, table=table, checkpoint_info=info,
                         options=BuildOptions(keep=keep)).path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "index"


def test_layout_manifest_and_current(root: Path) -> None:
    version = tiny_version(root)
    assert version.parent == root / "versions" and store.read_current(root) == version.name
    assert sorted(p.name for p in version.iterdir()) == ["captions.parquet", "index.faiss", "manifest.json"]
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["dim"] == 16 and manifest["count"] == 40 and manifest["metric"] == "inner_product"
    assert manifest["checkpoint"]["fingerprint"] == FINGERPRINT and manifest["index"]["type"] == "flat"
    assert set(manifest["files"]) == {"index.faiss", "captions.parquet"}
    assert manifest["files"]["index.faiss"]["sha256"] == store.sha256_file(version / "index.faiss")
    assert load_index(root).version == load_index(version).version == version.name


def test_other_fingerprint_or_dimension_is_refused(root: Path, tiny_checkpoint: Checkpoint) -> None:
    tiny_version(root, dim=24)
    with pytest.raises(IndexLoadError, match="fingerprint") as err:
        load_index(root, fingerprint="b" * 32)
    assert f"transresnet index build --checkpoint CHECKPOINT_DIR --captions /data/captions.csv --out {root}" \
        in str(err.value)
    with pytest.raises(IndexLoadError, match="holds 24-d vectors but checkpoint .* produces 16-d") as err:
        load_index(root, checkpoint=tiny_checkpoint)
    assert f"--checkpoint {tiny_checkpoint.path} " in str(err.value)
    load_index(root, fingerprint=FINGERPRINT)


def test_same_dimension_other_encoder_is_refused(root: Path, tiny_checkpoint: Checkpoint) -> None:
    tiny_version(root, dim=16)
    with pytest.raises(IndexLoadError, match=f"the checkpoint in use has fingerprint {tiny_checkpoint.fingerprint}"):
        load_index(root, checkpoint=tiny_checkpoint)


def test_truncated_corrupted_and_missing_files(root: Path) -> None:
    version = tiny_version(root)
    index_file = version / "index.faiss"
    data = index_file.read_bytes()
    index_file.write_bytes(data[: len(data) // 2])
    for verify in (True, False):
        with pytest.raises(IndexLoadError, match="index.faiss is truncated"):
            load_index(root, verify=verify)
    index_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(IndexLoadError, match="index.faiss is corrupted"):
        load_index(root)
    index_file.write_bytes(data)
    (version / "captions.parquet").unlink()
    with pytest.raises(IndexLoadError, match="missing captions.parquet; rebuild it: transresnet index build"):
        load_index(root)
    (version / "manifest.json").write_text("{not json")
    with pytest.raises(IndexLoadError, match="manifest.json is corrupted"):
        load_index(root)
    with pytest.raises(IndexLoadError, match="no caption index at"):
        load_index(root.parent / "elsewhere")


def test_failure_mid_write_keeps_previous_version(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tiny_version(root, seed=1)

    def broken(path: Path, table: CaptionTable) -> None:
        path.write_bytes(b"half a parquet file")
        raise OSError("disk full")

    monkeypatch.setattr(store, "write_captions", broken)
    with pytest.raises(OSError, match="disk full"):
        tiny_version(root, seed=2)
    assert store.read_current(root) == first.name and store.list_versions(root) == [first.name]
    assert not [p for p in (root / "versions").iterdir() if p.name.startswith(".")]  # staging removed
    assert load_index(root).search(np.ones(16, np.float32), 1)[0][0].caption.startswith("caption 1 ")


def test_crash_before_pointer_switch_keeps_previous_current(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tiny_version(root, seed=1)
    monkeypatch.setattr(store, "set_current", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        tiny_version(root, seed=2)
    assert store.read_current(root) == first.name  # the new directory exists but is not current
    assert load_index(root).version == first.name


def test_killed_build_process_leaves_previous_version(root: Path) -> None:
    first = tiny_version(root, seed=1)
    script = textwrap.dedent(f"""
        import os, signal
        from transresnet.index import store
        from tests.test_index_store import tiny_version
        real = store.file_entry
        def die(path):
            if path.name == "captions.parquet":
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a power cut mid-build
            return real(path)
        store.file_entry = die
        tiny_version(__import__("pathlib").Path({str(root)!r}), seed=2)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
    assert result.returncode == -9, result.stderr
    leftovers = [p for p in (root / "versions").iterdir() if p.name.startswith(store.STAGING_PREFIX)]
    assert len(leftovers) == 1 and (leftovers[0] / "index.faiss").exists()
    assert store.read_current(root) == first.name and load_index(root).version == first.name
    tiny_version(root, seed=3)  # the next build clears the dead build's staging directory
    assert not [p for p in (root / "versions").iterdir() if p.name.startswith(store.STAGING_PREFIX)]


def test_pruning_keeps_n_versions_and_never_the_current(root: Path) -> None:
    names = [tiny_version(root, seed=i, keep=2).name for i in range(4)]
    assert store.list_versions(root) == names[2:] and store.read_current(root) == names[3]
    store.set_current(root, names[2])  # roll back to the older one
    newer = tiny_version(root, seed=9, keep=5).name
    store.set_current(root, names[2])
    assert store.prune(root, keep=1) == [names[3], newer]
    assert store.list_versions(root) == [names[2]] and load_index(root).version == names[2]
    with pytest.raises(ValueError, match="at least 1"):
        store.prune(root, keep=0)
    with pytest.raises(ValueError, match="does not exist"):
        store.set_current(root, "nope")
