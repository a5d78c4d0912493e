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


def test_captions_are_memory_mapped_not_copied(root: Path) -> None:
    """Loading a version maps its Arrow caption file: no caption text lands in Arrow's heap, however many
    captions there are (the text of a million rows stays in the page cache)."""
    import pyarrow as pa

    version = tiny_version(root, n=20_000)
    before = pa.total_allocated_bytes()
    index = load_index(version, verify=False)
    assert pa.total_allocated_bytes() - before < 64 * 1024  # the captions alone are ~500 kB
    assert index.caption_texts()[19_999] == "caption 0 19999"


def test_format_1_versions_with_parquet_captions_still_load(root: Path) -> None:
    import pyarrow.parquet as pq

    version = tiny_version(root)
    expected = load_index(version).search(np.eye(16, dtype=np.float32)[:3], 5)
    captions = store.read_captions_table(version / store.CAPTIONS_FILE)
    pq.write_table(captions, version / store.LEGACY_CAPTIONS_FILE)
    (version / store.CAPTIONS_FILE).unlink()
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["format_version"] = 1
    del manifest["files"][store.CAPTIONS_FILE]
    manifest["files"][store.LEGACY_CAPTIONS_FILE] = store.file_entry(version / store.LEGACY_CAPTIONS_FILE)
    (version / "manifest.json").write_text(json.dumps(manifest))
    assert load_index(version).search(np.eye(16, dtype=np.float32)[:3], 5) == expected


def test_layout_manifest_and_current(root: Path) -> None:
    version = tiny_version(root)
    assert version.parent == root / "versions" and store.read_current(root) == version.name
    assert sorted(p.name for p in version.iterdir()) == ["captions.arrow", "index.faiss", "manifest.json"]
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["dim"] == 16 and manifest["count"] == 40 and manifest["metric"] == "inner_product"
    assert manifest["checkpoint"]["fingerprint"] == FINGERPRINT and manifest["index"]["type"] == "flat"
    assert set(manifest["files"]) == {"index.faiss", "captions.arrow"}
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
    (version / "captions.arrow").unlink()
    with pytest.raises(IndexLoadError, match="missing captions.arrow; rebuild it: transresnet index build"):
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
            if path.name == "captions.arrow":
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


# ------------------------------------------------------------------------------- the CURRENT pointer


@pytest.mark.parametrize(("pointer", "message"), [
    ("/etc", "is a path, not a version name"),
    ("../../elsewhere", "is a path, not a version name"),
    ("..", "is a relative directory reference"),
    ("sub/dir", "is a path, not a version name"),
    (".staging-x@host@1", "names a hidden or staging directory"),
    ("v1\x00", "contains control characters"),
])
def test_current_must_name_a_version_inside_versions(root: Path, pointer: str, message: str) -> None:
    tiny_version(root)
    (root / "versions" / "sub" / "dir").mkdir(parents=True)  # exists, but two levels down
    (root / "versions" / ".staging-x@host@1").mkdir()
    (root / "CURRENT").write_text(pointer + "\n")
    with pytest.raises(IndexLoadError, match=message) as err:
        load_index(root)
    assert f"run `transresnet index rollback {root}`" in str(err.value)
    assert repr(pointer) in str(err.value)  # shown with repr: a newline cannot forge a log line


def test_current_naming_a_symlink_out_of_versions_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tiny_version(tmp_path / "other")  # a complete, valid version, but in another root
    inside = tiny_version(root)
    (root / "versions" / "escape").symlink_to(outside, target_is_directory=True)
    (root / "CURRENT").write_text("escape\n")
    with pytest.raises(IndexLoadError, match="resolves outside"):
        load_index(root)
    with pytest.raises(IndexLoadError, match="resolves outside"):
        store.set_current(root, "escape")
    (root / "versions" / "zzz-newest").symlink_to(outside, target_is_directory=True)  # sorts newest
    (root / "CURRENT").write_text("missing\n")
    served = load_index(root, fallback=True)  # never one of the symlinks out of versions/
    assert served.version == inside.name and served.fallback.wanted == "missing"


def test_current_naming_a_missing_version_says_how_to_fix(root: Path) -> None:
    first = tiny_version(root)
    (root / "CURRENT").write_text("20990101T000000000000Z-gone00\n")
    with pytest.raises(IndexLoadError, match=f"which is missing from .*available: {first.name}.*index rollback"):
        load_index(root)


def test_set_current_refuses_paths(root: Path) -> None:
    first = tiny_version(root)
    for bad in (str(first), "../versions/" + first.name, "", "."):
        with pytest.raises(ValueError, match="available"):
            store.set_current(root, bad)
    assert store.read_current(root) == first.name


def test_failed_pointer_write_leaves_no_temp_file(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tiny_version(root)
    monkeypatch.setattr(store.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        store.set_current(root, first.name)
    assert not list(root.glob(".CURRENT.*"))


def test_prune_removes_temp_pointer_files_of_dead_writers(root: Path) -> None:
    first = tiny_version(root)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    host = store.socket.gethostname()
    stale = [root / f".CURRENT.{host}.{dead_pid}.abc123", root / f".CURRENT.{dead_pid}.def456"]  # new, old names
    alive = [root / f".CURRENT.{host}.{os.getpid()}.aaa111", root / f".CURRENT.otherhost.{dead_pid}.bbb222"]
    for path in stale + alive:
        path.write_text("half")
    store.prune(root, keep=3)
    assert sorted(p.name for p in root.glob(".CURRENT.*")) == sorted(p.name for p in alive)
    assert store.read_current(root) == first.name


# -------------------------------------------------------------------------------- non-finite vectors


def test_build_refuses_nonfinite_vectors(root: Path) -> None:
    vectors = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    vectors[[3, 17], 2] = np.nan
    vectors[30, 0] = np.inf
    table = CaptionTable(captions=[f"c {i}" for i in range(40)], ids=[f"id{i}" for i in range(40)], source="x",
                         format="csv", rows_read=40)
    info = {"path": "/ckpt", "fingerprint": FINGERPRINT, "embed_dim": 16, "scoring": "dot", "text_encoder": {}}
    with pytest.raises(ValueError, match=r"3 of 40 rows \(rows 3, 17, 30; caption ids 'id3', 'id17', 'id30'\) "
                                         "have NaN or infinite"):
        write_version(root, vectors=vectors, table=table, checkpoint_info=info, options=BuildOptions())
    assert store.list_versions(root) == [] and store.read_current(root) is None


def _poison_flat(version: Path, rows: list[int]) -> None:
    """Overwrite vectors of a flat index with NaN and re-record the file's size and checksum, as a buggy
    writer (one that skipped the build check) would have produced it."""
    import faiss

    index = faiss.read_index(str(version / store.INDEX_FILE))
    vectors = index.reconstruct_n(0, index.ntotal)
    vectors[rows] = np.nan
    index.reset()
    index.add(vectors)
    faiss.write_index(index, str(version / store.INDEX_FILE))
    manifest = json.loads((version / store.MANIFEST_FILE).read_text())
    manifest["files"][store.INDEX_FILE] = store.file_entry(version / store.INDEX_FILE)
    store.write_json(version / store.MANIFEST_FILE, manifest)


def test_load_refuses_nonfinite_vectors(root: Path) -> None:
    version = tiny_version(root)
    _poison_flat(version, [4, 9])
    for mmap in (False, True):
        with pytest.raises(IndexLoadError, match=r"NaN or infinite vectors in 2 of 40 rows \(rows 4, 9; "
                                                 r"caption ids '4', '9'\)"):
            load_index(root, mmap=mmap)


def test_pq_index_without_finite_record_is_refused(root: Path) -> None:
    vectors = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    table = CaptionTable(captions=[f"c {i}" for i in range(2000)], ids=[str(i) for i in range(2000)], source="x",
                         format="csv", rows_read=2000)
    info = {"path": "/ckpt", "fingerprint": FINGERPRINT, "embed_dim": 16, "scoring": "dot", "text_encoder": {}}
    version = write_version(root, vectors=vectors, table=table, checkpoint_info=info,
                            options=BuildOptions(index_type="ivfpq", tune_queries=50)).path
    assert load_index(root).manifest["finite_vectors"] is True
    manifest = json.loads((version / store.MANIFEST_FILE).read_text())
    del manifest["finite_vectors"]
    store.write_json(version / store.MANIFEST_FILE, manifest)
    with pytest.raises(IndexLoadError, match="cannot be checked for NaN"):
        load_index(root)


# ---------------------------------------------------------------------------- fallback and rollback


def test_fallback_serves_newest_verified_version(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    first = tiny_version(root, seed=1, keep=5)
    second = tiny_version(root, seed=2, keep=5)
    third = tiny_version(root, seed=3, keep=5)
    data = (third / store.INDEX_FILE).read_bytes()
    (third / store.INDEX_FILE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(IndexLoadError, match="checksum|corrupted"):
        load_index(root)  # without fallback a bad CURRENT is refused
    (second / store.CAPTIONS_FILE).write_bytes(b"x")  # the next newest is broken too
    with caplog.at_level(logging.WARNING):
        served = load_index(root, fallback=True)
    assert served.version == first.name
    assert served.fallback is not None and served.fallback.wanted == third.name
    assert served.fallback.serving == first.name and served.fallback.reason == "index.faiss checksum mismatch"
    assert f"names version {third.name!r}, which failed verification" in caplog.text
    assert f"serving version {first.name!r}" in caplog.text
    assert store.read_current(root) == third.name  # the pointer itself is left for the operator to fix
    with pytest.raises(IndexLoadError, match="no other version verifies either .*built for text encoder aaaa"):
        load_index(root, fallback=True, fingerprint="b" * 32)  # no version fits another checkpoint


def test_fallback_checks_checkpoint_and_gives_up_cleanly(root: Path) -> None:
    old = tiny_version(root, seed=1, keep=5, fingerprint="b" * 32)  # built for another text encoder
    new = tiny_version(root, seed=2, keep=5)
    (root / "CURRENT").write_text("../" + new.name)  # an invalid pointer: the versions themselves are fine
    served = load_index(root, fallback=True, fingerprint=FINGERPRINT)
    assert served.version == new.name and "is a path, not a version name" in served.fallback.reason
    served = load_index(root, fallback=True, fingerprint="b" * 32)  # the newest that fits this checkpoint
    assert served.version == old.name
    with pytest.raises(IndexLoadError, match=rf"is a path.*no other version verifies either \({new.name}: "
                                             "built for text encoder aaaaaaaaaaaa, not cccccccccccc"):
        load_index(root, fallback=True, fingerprint="c" * 32)
    store.set_current(root, new.name)
    assert load_index(root, fallback=True, fingerprint=FINGERPRINT).fallback is None
    with pytest.raises(IndexLoadError, match="no caption index at"):
        load_index(root.parent / "nothing", fallback=True)


def test_rollback_and_verify(root: Path) -> None:
    from transresnet.index.verify import rollback, verify_root

    names = [tiny_version(root, seed=i, keep=5).name for i in range(3)]
    assert verify_root(root).current_ok and all(v.ok for v in verify_root(root).versions)
    (root / "versions" / names[1] / store.INDEX_FILE).write_bytes(b"short")
    (root / "versions" / names[2] / store.MANIFEST_FILE).write_text("{}")
    report = verify_root(root)
    assert not report.current_ok and "fails verification" in report.pointer_problem
    assert [(v.version, v.ok, v.current) for v in report.versions] == [
        (names[0], True, False), (names[1], False, False), (names[2], False, True)]
    assert "truncated" in report.versions[1].reason and "index format" in report.versions[2].reason
    with pytest.raises(IndexLoadError, match=f"refusing to point .* at version '{names[1]}'.*truncated"):
        rollback(root, names[1])
    with pytest.raises(IndexLoadError, match="is a path"):
        rollback(root, "../x")
    assert store.read_current(root) == names[2]
    assert rollback(root) == (names[2], names[0])  # skips the broken names[1]
    assert verify_root(root).current_ok and load_index(root).version == names[0]
    with pytest.raises(IndexLoadError, match=f"no verified version older than the current version '{names[0]}'"):
        rollback(root)
