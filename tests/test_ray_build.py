"""`transresnet index build --engine ray`: the same table, vectors and search results as the local engine, a
killed worker retried or failing the build cleanly, the CLI end to end, and Ray kept out of the default path.

One local Ray instance serves the whole run (the ``ray_cluster`` fixture in conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transresnet.index.options import BuildOptions

from tests.helpers import SUBJECTS, VOICES
from transresnet.checkpoint import Checkpoint

pytestmark = pytest.mark.timeout(600)
COUNT = 3000


def _caption_rows() -> list[dict[str, str]]:
    """A few thousand short captions in four voices, with some empties and near-duplicates mixed in."""
    rows = []
    for i in range(COUNT):
        trait = list(VOICES)[i % len(VOICES)]
        caption = f"{VOICES[trait].format(SUBJECTS[i % len(SUBJECTS)])} No. {i // 20}"
        rows.append({"caption": caption, "personality": trait, "image": f"{i % 97}.jpg"})
    for i in range(0, COUNT, 50):
        rows.insert(i, {"caption": "  " if i % 100 else rows[i]["caption"].upper(), "personality": "Sweet",
                        "image": "dup.jpg"})
    return rows


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The captions as a folder of three shards: CSV, JSONL and Parquet."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("caption_shards")
    rows = _caption_rows()
    third = len(rows) // 3
    with open(folder / "part-0.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["caption", "personality", "image"])
        writer.writeheader()
        writer.writerows(rows[:third])
    (folder / "part-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[third:2 * third]),
                                         encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows[2 * third:]), folder / "part-2.parquet")
    return folder


@pytest.fixture(scope="module")
def local_build(tiny_checkpoint: Checkpoint, shard_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    from transresnet.index.build import build_index

    root = tmp_path_factory.mktemp("local_index")
    return build_index(tiny_checkpoint, shard_folder, root, BuildOptions(precision="float32"), progress=False)


def _ray_options(**changes) -> BuildOptions:
    return BuildOptions(precision="float32", engine="ray", workers=2, batch_size=64, **changes)


def _load(published):
    import faiss
    from transresnet.index import store

    index = faiss.read_index(str(published.path / store.INDEX_FILE))
    return index, store.read_captions_table(published.path / store.CAPTIONS_FILE).to_pylist()


def _vectors(published) -> np.ndarray:
    index, _ = _load(published)
    return index.reconstruct_n(0, index.ntotal)


def _assert_same_search(a: np.ndarray, b: np.ndarray, queries: np.ndarray, k: int = 10) -> None:
    from transresnet.index import faiss_index as fx

    scores_a, ids_a = fx.exact_search(a, queries, k)
    scores_b, ids_b = fx.exact_search(b, queries, k)
    np.testing.assert_allclose(scores_a, scores_b, atol=1e-5)
    assert (ids_a == ids_b).mean() > 0.99  # only exact score ties (1e-6 apart) may swap places


@pytest.fixture(scope="module")
def ray_build(ray_cluster, tiny_checkpoint: Checkpoint, shard_folder: Path,
              tmp_path_factory: pytest.TempPathFactory):
    from transresnet.index.build import build_index

    root = tmp_path_factory.mktemp("ray_index")
    return build_index(tiny_checkpoint, shard_folder, root, _ray_options())


def test_ray_build_gives_the_local_table_vectors_and_results(local_build, ray_build) -> None:
    index_local, rows_local = _load(local_build)
    index_ray, rows_ray = _load(ray_build)
    assert rows_ray == rows_local  # same dedupe, ids and metadata across the three shard formats
    assert ray_build.manifest["source"] == local_build.manifest["source"]
    source = local_build.manifest["source"]
    assert source["dropped_empty"] > 0 and source["dropped_duplicate"] > 0
    assert ray_build.manifest["index"]["factory"] == local_build.manifest["index"]["factory"] == "Flat"
    local, ray_vectors = _vectors(local_build), _vectors(ray_build)
    np.testing.assert_allclose(ray_vectors, local, atol=1e-5)  # float32 encoding, batched differently
    queries = np.random.default_rng(0).standard_normal((64, local.shape[1])).astype(np.float32)
    _assert_same_search(local, ray_vectors, np.concatenate([queries, local[::100]]))
    build = ray_build.manifest["build"]
    assert build["engine"]["name"] == "ray" and build["engine"]["workers"] == 2
    assert build["engine"]["read_tasks"] == 3
    assert build["engine"]["nodes"] == 1 and not build["engine"]["parallel_add"]  # FAISS threads add on one node
    assert local_build.manifest["build"]["engine"] == {"name": "local"}
    assert {"read_s", "encode_s", "add_s", "write_s", "total_s"} <= set(build["seconds"])


def test_ivf_vectors_added_in_parallel_tasks_match_a_sequential_add(ray_cluster) -> None:
    from transresnet.index import faiss_index as fx
    from transresnet.index.distributed import parallel_builder

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((6000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for spec in (fx.resolve_spec(fx.IndexSpec("ivf"), len(vectors), 32),
                 fx.resolve_spec(fx.IndexSpec("ivfpq", pq_m=8), len(vectors), 32)):
        train_ids = np.arange(100, len(vectors))
        sequential, _ = fx.build_faiss_index(vectors, spec, train_ids=train_ids, seed=3)
        parallel, timings = parallel_builder(ray_cluster, 3)(vectors, spec, train_ids=train_ids, seed=3)
        assert parallel.ntotal == sequential.ntotal == len(vectors) and "add_s" in timings
        for index in (sequential, parallel):
            fx.apply_params(index, {"nprobe": 4})
        queries = vectors[:100]
        assert np.array_equal(parallel.search(queries, 10)[1], sequential.search(queries, 10)[1]), spec.type


DIE_ON_ROW = 1234


def dying_encoder(marker: Path, *, once: bool, row: int = DIE_ON_ROW) -> type:
    """A test-only encoder actor class that kills its own process (os._exit) on the batch holding ``row``;
    with ``once``, only the first time (a marker file remembers), so Ray's retry succeeds. A local class,
    so Ray ships it by value (the test module is not importable in the workers)."""
    from transresnet.index.distributed import CaptionEncoder

    class Dying(CaptionEncoder):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if row in batch["row"] and not (once and marker.exists()):
                with open(marker, "a", encoding="utf-8") as handle:
                    handle.write(f"{os.getpid()}\n")
                os._exit(1)  # a real worker death, not an exception Ray could report
            return super().__call__(batch)

    return Dying


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_the_build_completes(ray_cluster, tiny_checkpoint: Checkpoint,
                                                            shard_folder: Path, local_build, tmp_path: Path) -> None:
    from transresnet.index.distributed import build_index_ray

    marker = tmp_path / "died"
    published = build_index_ray(tiny_checkpoint, shard_folder, tmp_path / "index", _ray_options(),
                                encoder=dying_encoder(marker, once=True))
    assert len(marker.read_text().split()) == 1  # one actor process really died
    np.testing.assert_allclose(_vectors(published), _vectors(local_build), atol=1e-5)


@pytest.mark.slow
def test_a_worker_that_keeps_dying_fails_the_build_and_publishes_nothing(ray_cluster, tiny_checkpoint: Checkpoint,
                                                                         shard_folder: Path, local_build,
                                                                         tmp_path: Path) -> None:
    from transresnet.index import store
    from transresnet.index.distributed import build_index_ray

    root = tmp_path / "index"
    shutil.copytree(local_build.path.parent.parent, root)  # an index with a current version
    before = (store.read_current(root), store.list_versions(root))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = root / f".vectors-left@{socket.gethostname()}@{gone.pid}"  # from a build killed earlier
    stale.mkdir()
    marker = tmp_path / "died"
    with pytest.raises(RuntimeError, match="no index version was published"):
        build_index_ray(tiny_checkpoint, shard_folder, root, _ray_options(), encoder=dying_encoder(marker, once=False),
                        max_retries=1)
    assert len(marker.read_text().split()) == 2  # the first try and its one retry
    assert (store.read_current(root), store.list_versions(root)) == before
    # Neither this build's vectors nor the stale ones remain.
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in local_build.path.parent.parent.iterdir())
    assert not list(store.versions_dir(root).glob(".*"))  # no staging directory left either


def test_cli_builds_with_engine_ray(ray_cluster, tiny_checkpoint: Checkpoint, shard_folder: Path,
                                    local_build, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transresnet.cli import main

    root = tmp_path / "cli_index"
    code = main(["index", "build", "--checkpoint", str(tiny_checkpoint.path), "--captions",
                 str(shard_folder / "part-0.csv"), str(shard_folder / "part-1.jsonl"),
                 str(shard_folder / "part-2.parquet"), "--out", str(root), "--engine", "ray", "--workers", "1"])
    assert code == 0
    assert "published" in capsys.readouterr().out
    from transresnet.index import store
    from transresnet.index.captions import read_captions

    from transresnet.encode import choose_precision

    manifest = store.read_manifest(store.resolve_version_dir(root))
    assert manifest["build"]["engine"]["workers"] == 1 and manifest["count"] == local_build.manifest["count"]
    assert manifest["build"]["options"]["engine"] == "ray"
    # --precision auto: the actors decide on the local engine's calibration captions, so they choose alike.
    local_choice = choose_precision(tiny_checkpoint.model, read_captions(shard_folder).captions, "auto")
    assert manifest["encoding"]["precision"] == local_choice


def test_a_bad_row_deep_in_a_shard_fails_with_the_readers_own_message(ray_cluster, shard_folder: Path,
                                                                     tmp_path: Path) -> None:
    from transresnet.index.distributed import read_table_ray

    shards = tmp_path / "shards"
    shutil.copytree(shard_folder, shards)
    with open(shards / "part-1.jsonl", "a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    with pytest.raises(ValueError, match=r"part-1.jsonl line \d+ is not valid JSON.*in a Ray task"):
        read_table_ray(ray_cluster, shards)


def test_a_worker_shape_the_cluster_cannot_host_is_refused_not_waited_for(ray_cluster, tiny_checkpoint: Checkpoint,
                                                                          shard_folder: Path, tmp_path: Path) -> None:
    from transresnet.index.distributed import build_index_ray

    with pytest.raises(ValueError, match="needs 1 CPUs and 1 GPUs, but the Ray cluster has 2 CPUs and 0 GPUs"):
        build_index_ray(tiny_checkpoint, shard_folder, tmp_path / "index", _ray_options(gpus_per_worker=1))
    assert not (tmp_path / "index").exists()


def test_rows_travel_from_read_tasks_without_changing_the_table() -> None:
    from transresnet.index.captions import collect
    from transresnet.index.distributed import _columns, _rows

    rows = [{"caption": "one", "id": 7}, {"caption": "two", "id": None, "personality": "Sweet", "x": {"a": [1]}},
            {"caption": None, "id": "gone"}, {"caption": " "}, {"id": "", "caption": "three", "late": 2.5},
            {"caption": "ONE"}, {"caption": "four", "personality": None}]
    travelled = [row for batch in (_columns(rows[:3]), _columns(rows[3:])) for row in _rows(batch)]
    assert collect(travelled) == collect(rows)


def test_engine_ray_without_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from transresnet.index.distributed import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as on a default install
    with pytest.raises(ImportError, match=r"pip install 'transresnet\[distributed\]'"):
        require_ray()


def test_ray_flags_are_refused_with_the_local_engine() -> None:
    with pytest.raises(ValueError, match="--workers, --gpus-per-worker apply only to --engine ray"):
        BuildOptions(workers=4, gpus_per_worker=1)


def test_a_ray_flag_given_at_its_default_is_refused_by_the_cli_too(tmp_path: Path, caplog) -> None:
    """`--workers 2` equals the default, yet the user expected Ray: the flags given count, not their values
    (and options recorded with every field, as a manifest holds them, still validate)."""
    from transresnet.cli import main

    assert main(["index", "build", "--checkpoint", str(tmp_path), "--captions", str(tmp_path / "c.txt"),
                 "--out", str(tmp_path / "out"), "--workers", "2"]) != 0
    assert "--workers applies only to --engine ray" in caplog.text
    assert not (tmp_path / "out").exists()
    assert BuildOptions.model_validate(BuildOptions().model_dump()).engine == "local"


def test_the_default_install_path_imports_no_ray() -> None:
    code = ("import sys, transresnet.cli, transresnet.index.build, transresnet.index.distributed\n"
            "from transresnet.cli import build_parser\n"
            "build_parser().parse_args(['index', 'build', '--checkpoint', 'c', '--captions', 'x', '--out', 'o'])\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
