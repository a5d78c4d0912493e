"""`transresnet index add` / `index remove`: new versions from the current one give the same results as a full
rebuild, encode only the new captions, keep FAISS id i = captions row i, and refuse what they must."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transresnet.index import faiss_index as fx
from transresnet.index import store
from transresnet.index.incremental import add_captions, read_ids, remove_captions, stored_vectors
from transresnet.index.options import UpdateOptions
from transresnet.index.search import CaptionIndex, load_index
from transresnet.index.verify import verify_root

import transresnet.encode
from tests.helpers import TINY_TRAITS, VOICES, build_test_index, service_captions
from transresnet.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from transresnet.cli import main
from transresnet.config import ExperimentConfig
from transresnet.files import sha256_file
from transresnet.model import create_model
from transresnet.traits import TraitVocab

NEW_SUBJECTS = ("a green kite", "the old lighthouse", "a sleepy owl", "two bicycles", "a snowy field",
                "a jazz band", "a plate of pasta", "the night market", "a paper boat", "a rainy window")
IVF = {"index_type": "ivf", "nlist": 4}
IVFPQ_REFINE = {"index_type": "ivfpq", "nlist": 4, "refine": True}


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Tiny indexes: OpenMP start-up on a shared 2-core runner costs more than it saves."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config: ExperimentConfig) -> Checkpoint:
    """Same architecture as tiny_checkpoint, other random weights: another text fingerprint."""
    torch.manual_seed(1)
    model = create_model(tiny_config.model, TraitVocab(TINY_TRAITS))
    return load_checkpoint(save_checkpoint(model, tiny_config, tmp_path_factory.mktemp("other") / "best"))


def build(checkpoint: Checkpoint, root: Path, captions: list[str] | None = None, **options: object) -> Path:
    """build_test_index in float32, so that results compare exactly with the versions derived from it (an
    update encodes with the parent's recorded precision; "auto" may pick a reduced one per caption set)."""
    return build_test_index(checkpoint, root, captions, precision="float32", **options)


def new_captions() -> list[str]:
    return [template.format(subject) for template in VOICES.values() for subject in NEW_SUBJECTS]


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def queries(dim: int, n: int = 12) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((n, dim)).astype(np.float32)


def exhaustive_topk(caption_index: CaptionIndex, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search with every IVF list probed (a refine stage re-ranking them all; HNSW's widest beam)."""
    index = caption_index.faiss_index
    params = fx.search_parameters(index, fx.exhaustive_params(index, len(caption_index)))
    return index.search(q, k, params=params)


def captions_of(caption_index: CaptionIndex) -> list[str]:
    return caption_index._captions.column("caption").to_pylist()


def current(root: Path) -> str | None:
    return store.read_current(root)


# ------------------------------------------------------------------------------------------- add


def test_add_to_flat_equals_rebuild_and_encodes_only_new(tiny_checkpoint: Checkpoint, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "index"
    parent = build(tiny_checkpoint, root)
    fresh = new_captions()
    duplicates = ["OH GREAT, a dog again.   How thrilling.", "aww, look at two cats, how lovely!"]
    rows = [{"id": f"n{i}", "caption": text} for i, text in enumerate(fresh[:20])]
    rows += [{"id": f"d{i}", "caption": text} for i, text in enumerate(duplicates)]
    rows += [{"id": f"n{i + 20}", "caption": text} for i, text in enumerate(fresh[20:])]
    new_file = write_csv(tmp_path / "new.csv", rows)

    encoded: list[str] = []
    real = transresnet.encode.encode_captions

    def counting(model, texts, **kwargs):
        encoded.extend(texts)
        return real(model, texts, **kwargs)

    monkeypatch.setattr(transresnet.encode, "encode_captions", counting)
    update = add_captions(root, new_file, tiny_checkpoint, progress=False)
    assert sorted(encoded) == sorted(fresh)  # the 40 index captions and the 2 duplicates were not encoded
    assert update.published is not None and current(root) == update.published.path.name
    assert "2 already in the index skipped" in update.message

    manifest = update.published.manifest
    lineage = manifest["lineage"]
    assert lineage["operation"] == "add" and lineage["parent"]["version"] == parent.name
    assert lineage["parent"]["files"] == store.read_manifest(parent)["files"]
    assert lineage["parent"]["manifest_sha256"] == sha256_file(parent / store.MANIFEST_FILE)
    assert lineage["input"][0]["sha256"] == sha256_file(new_file)
    assert lineage["added"] == lineage["encoded"] == manifest["encoding"]["encoded"] == 40
    assert lineage["already_indexed"] == 2 and lineage["dropped_duplicate"] == 0 and manifest["count"] == 80
    assert manifest["files"][store.INDEX_FILE]["sha256"] == sha256_file(update.published.path / store.INDEX_FILE)

    rebuilt = load_index(build(tiny_checkpoint, tmp_path / "rebuilt", service_captions() + fresh))
    added = load_index(root, checkpoint=tiny_checkpoint)
    assert captions_of(added) == captions_of(rebuilt)
    q = queries(added.dim)
    scores, ids = added.search_ids(q, 10)
    ref_scores, ref_ids = rebuilt.search_ids(q, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert added.search(q[0], 80)[0][-1].row >= 0  # every row is searchable
    assert verify_root(root).current_ok


@pytest.mark.parametrize("options", [IVF, IVFPQ_REFINE], ids=["ivf", "ivfpq-refine"])
def test_add_to_ivf_reuses_quantizer_and_equals_rebuild(tiny_checkpoint: Checkpoint, tmp_path: Path,
                                                        options: dict) -> None:
    root = tmp_path / "index"
    parent = load_index(build(tiny_checkpoint, root, **options))
    fresh = new_captions()
    (tmp_path / "new.txt").write_text("\n".join(fresh) + "\n", encoding="utf-8")
    update = add_captions(root, tmp_path / "new.txt", tiny_checkpoint, progress=False)
    assert update.published is not None
    added = load_index(root)

    def ivf_of(caption_index: CaptionIndex) -> faiss.IndexIVF:
        index = faiss.downcast_index(caption_index.faiss_index)
        return faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index

    centroids = [ivf_of(i).quantizer.reconstruct_n(0, ivf_of(i).nlist) for i in (parent, added)]
    np.testing.assert_array_equal(*centroids)  # the trained quantizer was reused, not retrained
    assert ivf_of(added).invlists.compute_ntotal() == 80 == len(added)

    rebuilt = load_index(build(tiny_checkpoint, tmp_path / "rebuilt", service_captions() + fresh))
    assert captions_of(added) == captions_of(rebuilt)
    assert added._captions.column("id").to_pylist() == [str(i) for i in range(80)]  # a .txt numbers on
    q = queries(added.dim)
    scores, ids = exhaustive_topk(added, q, 10)
    ref_scores, ref_ids = rebuilt.search_ids(q, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)

    manifest = added.manifest
    recheck = manifest["lineage"]["recheck"]
    assert recheck["params"] == parent.manifest["index"]["search_params"] and recheck["truth"] == "exact vectors"
    assert 0.0 <= recheck["recall"] <= 1.0 and recheck["retuned"] == (not recheck["reached"])
    assert manifest["index"]["tuning"]["recall"] >= (recheck["recall"] if recheck["retuned"] else 0.0)
    assert manifest["index"]["factory"] == parent.manifest["index"]["factory"]
    assert verify_root(root).current_ok


def test_add_to_hnsw_inserts_into_the_graph(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    root = tmp_path / "index"
    build(tiny_checkpoint, root, index_type="hnsw")
    (tmp_path / "new.txt").write_text("\n".join(new_captions()), encoding="utf-8")
    update = add_captions(root, tmp_path / "new.txt", tiny_checkpoint, progress=False)
    assert update.published is not None and "HNSW graph" in update.published.manifest["lineage"]["index_update"]
    added = load_index(root)
    vectors, exact = stored_vectors(added.faiss_index)
    assert exact and len(vectors) == 80
    q = queries(added.dim)
    _, truth = fx.exact_search(vectors, q, 10)
    _, found = exhaustive_topk(added, q, 10)
    assert fx.recall_at(found, truth, 10) >= 0.9 and (found >= 40).any()  # new rows are reachable in the graph


def test_add_of_nothing_new_publishes_nothing(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    root = tmp_path / "index"
    parent = build(tiny_checkpoint, root)
    again = write_csv(tmp_path / "again.csv", [{"id": f"x{i}", "caption": f"  {text.upper()} "}
                                                for i, text in enumerate(service_captions()[:5])])
    update = add_captions(root, again, tiny_checkpoint, progress=False)
    assert update.published is None and "nothing to add" in update.message and "nothing published" in update.message
    assert store.list_versions(root) == [parent.name] and current(root) == parent.name


def test_add_refuses_clashing_ids(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    root = tmp_path / "index"
    parent = build(tiny_checkpoint, root)
    clash = write_csv(tmp_path / "clash.csv", [{"id": "3", "caption": "a brand new caption"},
                                               {"id": "n1", "caption": "another new caption"}])
    with pytest.raises(ValueError, match=r"1 of the 2 new captions .* ids that the index already holds.*'3'"):
        add_captions(root, clash, tiny_checkpoint, progress=False)
    assert current(root) == parent.name


def test_add_and_remove_refuse_another_checkpoint(tiny_checkpoint: Checkpoint, other_checkpoint: Checkpoint,
                                                  tmp_path: Path) -> None:
    assert other_checkpoint.fingerprint != tiny_checkpoint.fingerprint
    root = tmp_path / "index"
    parent = build(tiny_checkpoint, root)
    (tmp_path / "new.txt").write_text("a brand new caption\n", encoding="utf-8")
    (tmp_path / "ids.txt").write_text("1\n", encoding="utf-8")
    with pytest.raises(store.IndexLoadError, match=r"refusing to add captions: .*fingerprint"):
        add_captions(root, tmp_path / "new.txt", other_checkpoint, progress=False)
    with pytest.raises(store.IndexLoadError, match=r"refusing to remove captions: .*fingerprint"):
        remove_captions(root, tmp_path / "ids.txt", checkpoint=other_checkpoint)
    assert store.list_versions(root) == [parent.name]


def test_corrupt_parent_is_refused(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    root = tmp_path / "index"
    parent = build(tiny_checkpoint, root)
    index_file = parent / store.INDEX_FILE
    data = bytearray(index_file.read_bytes())
    data[-5] ^= 0xFF  # same size, other bytes: only the checksum notices
    index_file.write_bytes(bytes(data))
    (tmp_path / "new.txt").write_text("a brand new caption\n", encoding="utf-8")
    with pytest.raises(store.IndexLoadError, match=r"on top of a bad version: .*sha256 differs"):
        add_captions(root, tmp_path / "new.txt", tiny_checkpoint, progress=False)
    assert store.list_versions(root) == [parent.name]


def test_interrupted_add_leaves_the_parent_current(tiny_checkpoint: Checkpoint, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "index"
    parent = build(tiny_checkpoint, root)
    (tmp_path / "new.txt").write_text("a brand new caption\n", encoding="utf-8")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_captions", disk_full)  # fails inside the staging directory
    with pytest.raises(OSError, match="No space left"):
        add_captions(root, tmp_path / "new.txt", tiny_checkpoint, progress=False)
    assert current(root) == parent.name and store.list_versions(root) == [parent.name]
    assert not list(store.versions_dir(root).glob(f"{store.STAGING_PREFIX}*"))


def test_add_refuses_to_publish_over_a_version_published_meanwhile(tiny_checkpoint: Checkpoint, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "index"
    build(tiny_checkpoint, root)
    (tmp_path / "new.txt").write_text("a brand new caption\n", encoding="utf-8")
    real = store.write_captions
    others: list[Path] = []

    def another_build_lands_first(path: Path, table) -> None:
        if not others:  # a concurrent `index build` publishes while this add is staging
            others.append(root)  # marks it started: that build writes captions through here too
            others[0] = build(tiny_checkpoint, root, service_captions()[:5])
        real(path, table)

    monkeypatch.setattr(store, "write_captions", another_build_lands_first)
    with pytest.raises(RuntimeError, match="changed to .* during this add .*run it again"):
        add_captions(root, tmp_path / "new.txt", tiny_checkpoint, progress=False)
    assert current(root) == others[0].name and len(store.list_versions(root)) == 2


# ----------------------------------------------------------------------------------------- remove


@pytest.mark.parametrize("options", [{}, IVF, {"index_type": "hnsw"}], ids=["flat", "ivf", "hnsw"])
def test_remove_equals_rebuild_and_keeps_rows_aligned(tiny_checkpoint: Checkpoint, tmp_path: Path,
                                                      options: dict, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "index"
    everything = service_captions() + new_captions()
    parent = load_index(build(tiny_checkpoint, root, everything, **options))
    parent_vectors = dict(zip(captions_of(parent), stored_vectors(parent.faiss_index)[0], strict=True))
    doomed = [0, 7, 8, 39, 40, 79]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join([*map(str, doomed), "nope-1", "", "nope-2", "7"]) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        update = remove_captions(root, ids_file, update=UpdateOptions(keep=1))
    assert "2 of the 8 ids" in caplog.text and "'nope-1', 'nope-2'" in caplog.text
    assert update.published is not None and store.list_versions(root) == [update.published.path.name]  # keep=1
    lineage = update.published.manifest["lineage"]
    assert lineage["removed"] == 6 and lineage["unknown"] == 2 and lineage["unknown_first"] == ["nope-1", "nope-2"]
    assert lineage["parent"]["version"] == parent.version and lineage["encoded"] == 0

    kept = [text for i, text in enumerate(everything) if i not in doomed]
    removed = load_index(root, checkpoint=tiny_checkpoint)
    assert captions_of(removed) == kept and len(removed) == 74
    assert removed._captions.column("id").to_pylist() == [str(i) for i in range(80) if i not in doomed]
    vectors, exact = stored_vectors(removed.faiss_index)
    assert exact
    np.testing.assert_array_equal(vectors, np.stack([parent_vectors[text] for text in kept]))  # id i = row i

    rebuilt = load_index(build(tiny_checkpoint, tmp_path / "rebuilt", kept))
    q = queries(removed.dim)
    ref_scores, ref_ids = rebuilt.search_ids(q, 10)
    if options.get("index_type") == "hnsw":
        assert "rebuilt" in lineage["index_update"] and lineage["recheck"]["rebuilt"]
        _, ids = exhaustive_topk(removed, q, 10)
        assert fx.recall_at(ids, ref_ids, 10) >= 0.9
    else:
        scores, ids = exhaustive_topk(removed, q, 10)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert verify_root(root).current_ok


def test_remove_from_ivfpq_renumbers_the_codes(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    """PQ codes cannot be compared with a rebuild (other codebooks); the kept codes must be the parent's,
    under their new row numbers: the parent's exhaustive ranking minus the removed rows, renumbered."""
    root = tmp_path / "index"
    everything = service_captions() + new_captions()
    parent = load_index(build(tiny_checkpoint, root, everything, index_type="ivfpq", nlist=4))
    doomed = np.array([2, 3, 50, 61])
    (tmp_path / "ids.csv").write_text("id,why\n" + "".join(f"{i},stale\n" for i in doomed), encoding="utf-8")
    update = remove_captions(root, tmp_path / "ids.csv")
    assert update.published is not None
    removed = load_index(root)
    assert removed.manifest["lineage"]["recheck"]["truth"].startswith("decoded PQ codes")
    q = queries(removed.dim)
    parent_scores, parent_ids = exhaustive_topk(parent, q, 80)
    scores, ids = exhaustive_topk(removed, q, 76)
    new_row = np.cumsum(~np.isin(np.arange(80), doomed)) - 1
    for row in range(len(q)):
        keep = ~np.isin(parent_ids[row], doomed)
        np.testing.assert_array_equal(np.sort(ids[row]), np.arange(76))
        np.testing.assert_allclose(np.sort(scores[row]), np.sort(parent_scores[row][keep]), rtol=1e-5, atol=1e-5)
        by_new = dict(zip(ids[row].tolist(), scores[row].tolist(), strict=True))
        for old, score in zip(parent_ids[row][keep].tolist(), parent_scores[row][keep].tolist(), strict=True):
            assert by_new[int(new_row[old])] == pytest.approx(score, abs=1e-5)
    assert captions_of(removed) == [t for i, t in enumerate(everything) if i not in doomed]
    assert verify_root(root).current_ok


def test_remove_refuses_nothing_known_and_everything(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    root = tmp_path / "index"
    parent = build(tiny_checkpoint, root, service_captions()[:6])
    (tmp_path / "unknown.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"none of the 2 ids .* is in the index .*'a', 'b'.*nothing was removed"):
        remove_captions(root, tmp_path / "unknown.txt")
    (tmp_path / "all.txt").write_text("\n".join(map(str, range(6))), encoding="utf-8")
    with pytest.raises(ValueError, match="names every one of the index's 6 captions"):
        remove_captions(root, tmp_path / "all.txt")
    assert store.list_versions(root) == [parent.name]


def test_read_ids_formats(tmp_path: Path) -> None:
    (tmp_path / "ids.txt").write_text(" a \n\nb\na\n", encoding="utf-8")
    assert read_ids(tmp_path / "ids.txt") == ["a", "b"]
    (tmp_path / "ids.tsv").write_text("caption\tid\nx\t7\ny\t 8\n", encoding="utf-8")
    assert read_ids(tmp_path / "ids.tsv") == ["7", "8"]
    (tmp_path / "ids.jsonl").write_text('{"id": 5}\n\n{"id": "c9"}\n', encoding="utf-8")
    assert read_ids(tmp_path / "ids.jsonl") == ["5", "c9"]
    pq.write_table(pa.table({"id": ["p1", None, "p2"], "caption": ["x", "y", "z"]}), tmp_path / "ids.parquet")
    assert read_ids(tmp_path / "ids.parquet") == ["p1", "p2"]
    (tmp_path / "bad.csv").write_text("caption\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no 'id' column"):
        read_ids(tmp_path / "bad.csv")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no caption ids"):
        read_ids(tmp_path / "empty.txt")


# -------------------------------------------------------------------------------------------- CLI


def test_cli_add_remove_verify(tiny_checkpoint: Checkpoint, other_checkpoint: Checkpoint, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "index"
    parent = build(tiny_checkpoint, root)
    new_file = write_csv(tmp_path / "new.csv", [{"id": f"n{i}", "caption": text, "personality": "Sweet"}
                                                for i, text in enumerate(new_captions()[:6])])
    ckpt = str(tiny_checkpoint.path)
    assert main(["index", "add", "--index", str(root), "--captions", str(new_file), "--checkpoint", ckpt,
                 "--batch-size", "4"]) == 0
    assert "added 6 captions" in capsys.readouterr().out
    info = json.loads((store.resolve_version_dir(root) / store.MANIFEST_FILE).read_text())
    assert info["lineage"]["parent"]["version"] == parent.name and info["encoding"]["batch_size"] == 4

    assert main(["index", "add", "--index", str(root), "--captions", str(new_file), "--checkpoint", ckpt]) == 0
    assert "nothing to add" in capsys.readouterr().out

    (tmp_path / "ids.txt").write_text("n0\nn5\n0\n", encoding="utf-8")
    assert main(["index", "remove", "--index", str(root), "--ids", str(tmp_path / "ids.txt"),
                 "--checkpoint", ckpt, "--keep", "2"]) == 0
    assert "removed 3 captions" in capsys.readouterr().out
    assert len(store.list_versions(root)) == 2
    assert main(["index", "verify", str(root)]) == 0
    assert "current version ok" in capsys.readouterr().out
    ids = load_index(root)._captions.column("id").to_pylist()
    assert len(ids) == 43 and "n0" not in ids and "0" not in ids and ids[-4:] == ["n1", "n2", "n3", "n4"]

    with caplog.at_level(logging.ERROR):
        assert main(["index", "add", "--index", str(root), "--captions", str(new_file),
                     "--checkpoint", str(other_checkpoint.path)]) == 2
        assert "refusing to add captions" in caplog.text and "fingerprint" in caplog.text
        assert main(["index", "remove", "--index", str(tmp_path / "nothing"), "--ids", str(tmp_path / "ids.txt")]) == 2
        assert "no caption index at" in caplog.text
