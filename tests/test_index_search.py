"""Searching a published index: exact = numpy, approximate types reach their recall target, trait
filters, k and query validation, concurrent searches."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from transresnet.index import faiss_index as fx
from transresnet.index.build import BuildOptions, write_version
from transresnet.index.captions import CaptionTable
from transresnet.index.search import CaptionIndex, load_index

TRAITS = ["Sweet", "Angry", "Sarcastic"]


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """These indexes are tiny: OpenMP start-up and spin-waiting on a shared 2-core runner cost more
    (10x for k-means) than the parallelism saves."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)
INFO = {"path": "/ckpt", "fingerprint": "f" * 32, "embed_dim": 0, "scoring": "dot", "text_encoder": {}}


def clustered(n: int, dim: int, *, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors from a gaussian mixture (real embeddings cluster; uniform noise has no neighbours)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    points = centres[rng.integers(clusters, size=n)] + 0.6 * rng.standard_normal((n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def table_for(n: int, *, tags: list[str | None] | None = None) -> CaptionTable:
    metadata = {"personality": tags} if tags is not None else {}
    return CaptionTable(captions=[f"caption {i}" for i in range(n)], ids=[f"c{i}" for i in range(n)],
                        metadata=metadata, source="synthetic", format="test", rows_read=n)


def publish(root: Path, vectors: np.ndarray, *, tags: list[str | None] | None = None, **options) -> CaptionIndex:
    info = {**INFO, "embed_dim": vectors.shape[1]}
    write_version(root, vectors=vectors, table=table_for(len(vectors), tags=tags), checkpoint_info=info,
                  options=BuildOptions(**options))
    return load_index(root)


def numpy_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def test_exact_search_equals_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((700, 24)).astype(np.float32)  # dot scoring: not normalised
    queries = rng.standard_normal((9, 24)).astype(np.float32)
    queries = np.concatenate([queries, rng.standard_normal((31, 24)).astype(np.float32)])
    index = publish(tmp_path, vectors)
    ref_scores, ref_ids = numpy_topk(vectors, queries, 15)
    for rows in (slice(0, 9), slice(0, 40)):  # small batches take the BLAS path, larger ones FAISS's
        scores, ids = index.search_ids(queries[rows], 15)
        np.testing.assert_array_equal(ids, ref_ids[rows])
        np.testing.assert_allclose(scores, ref_scores[rows], rtol=1e-5, atol=1e-5)
    hits = index.search(queries[0], 3)[0]  # one (D,) vector is a batch of one
    assert [h.row for h in hits] == ref_ids[0, :3].tolist()
    assert [h.id for h in hits] == [f"c{i}" for i in ref_ids[0, :3]]
    assert hits[0].caption == f"caption {ref_ids[0, 0]}" and hits[0].score == pytest.approx(ref_scores[0, 0], 1e-5)
    assert len(index) == 700 and index.manifest["index"]["type"] == "flat"


@pytest.mark.parametrize(("index_type", "extra"), [
    ("ivf", {}),
    ("hnsw", {"hnsw_m": 16, "ef_construction": 40}),
    ("ivfpq", {"refine": True}),
])
def test_approximate_types_reach_recall_target(tmp_path: Path, index_type: str, extra: dict) -> None:
    draws = clustered(6600, 32)
    vectors, tune, check = draws[:6000], draws[6000:6300], draws[6300:]  # queries: unseen draws, same mixture
    np.save(tmp_path / "queries.npy", tune)
    index = publish(tmp_path / "idx", vectors, index_type=index_type, recall_target=0.95,
                    queries=str(tmp_path / "queries.npy"), **extra)
    tuning = index.manifest["index"]["tuning"]
    assert tuning["reached"] and tuning["recall"] >= 0.95 and tuning["n_queries"] == 300
    assert index.manifest["index"]["search_params"]  # nprobe / efSearch (/ k_factor) were chosen
    _, truth = numpy_topk(vectors, check, 10)
    _, found = index.search_ids(check, 10)
    assert fx.recall_at(found, truth, 10) >= 0.93  # holds on queries the tuning never saw


def test_ivfpq_without_refine_reports_its_recall_honestly(tmp_path: Path) -> None:
    vectors = clustered(6000, 32)
    index = publish(tmp_path, vectors, index_type="ivfpq", recall_target=0.999, tune_queries=300)
    tuning = index.manifest["index"]["tuning"]
    assert tuning["queries"] == "held-out caption vectors"
    assert tuning["reached"] is False and tuning["recall"] < 0.999
    assert index.manifest["index"]["factory"] == "IVF128,PQ8x7"  # 4 sqrt(n) lists, >= 39 points each


def test_auto_picks_by_size_and_memory_budget() -> None:
    assert fx.choose_auto(50_000, 500, 16 << 30).type == "flat"
    assert fx.choose_auto(2_000_000, 500, 16 << 30).type == "ivf"
    small = fx.choose_auto(2_000_000, 500, 1 << 30)
    assert small.type == "ivfpq" and fx.estimate_memory(small, 2_000_000, 500) <= 1 << 30
    assert "budget" in small.reason
    with pytest.raises(ValueError, match="memory-budget"):
        fx.choose_auto(100_000_000, 500, 1 << 30)


def test_trait_filter_returns_only_tagged_captions(tmp_path: Path) -> None:
    vectors = clustered(3000, 16, seed=3)
    tags: list[str | None] = [TRAITS[i % 3] if i % 10 else None for i in range(3000)]
    tags[5] = "sweet "  # another spelling of the same trait
    queries = clustered(8, 16, seed=4)
    for index_type in ("flat", "ivf", "hnsw"):
        index = publish(tmp_path / index_type, vectors, tags=tags, index_type=index_type, tune_queries=100)
        for hits in index.search(queries, 20, personality="SWEET"):
            assert len(hits) == 20
            assert {h.metadata["personality"].strip().lower() for h in hits} == {"sweet"}
        scores, ids = index.search_ids(queries, 20, personality="Angry")
        assert all(tags[i] == "Angry" for i in ids.ravel())
    sweet = [i for i, t in enumerate(tags) if t and t.strip().lower() == "sweet"]
    _, exact_ids = numpy_topk(vectors[sweet], queries, 5)
    flat = load_index(tmp_path / "flat")
    np.testing.assert_array_equal(flat.search_ids(queries, 5, personality="Sweet")[1], np.array(sweet)[exact_ids])
    assert flat.personality_counts()["Sweet"] == len(sweet)
    with pytest.raises(ValueError, match="no caption in this index is tagged with personality 'Happy'"):
        flat.search(queries, 5, personality="Happy")
    with pytest.raises(ValueError, match=f"k=5000 exceeds the {len(sweet)} captions tagged 'Sweet'"):
        flat.search(queries, 5000, personality="Sweet")


def test_filter_on_untagged_index_and_bad_k(tmp_path: Path) -> None:
    index = publish(tmp_path, clustered(50, 8))
    query = clustered(2, 8, seed=1)
    with pytest.raises(ValueError, match="no personality tags"):
        index.search(query, 3, personality="Sweet")
    for k in (0, -1, 51):
        with pytest.raises(ValueError, match="k"):
            index.search(query, k)
    with pytest.raises(ValueError, match=r"shape \(batch, 8\)"):
        index.search(np.zeros((2, 9), np.float32), 3)
    assert len(index.search(query, 50)[0]) == 50


def test_concurrent_searches_match_sequential(tmp_path: Path) -> None:
    vectors = clustered(4000, 16, seed=5)
    tags = [TRAITS[i % 3] for i in range(4000)]
    index = publish(tmp_path, vectors, tags=tags, index_type="ivf", tune_queries=200)
    queries = clustered(64, 16, seed=6)
    jobs = [(queries[i: i + 1], 10, TRAITS[i % 3] if i % 2 else None) for i in range(64)]
    expected = [index.search_ids(*job)[1] for job in jobs]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: index.search_ids(*job)[1], jobs * 4))
    for i, ids in enumerate(results):
        np.testing.assert_array_equal(ids, expected[i % 64])


def _stored_codes(index: object) -> object:
    """The FAISS vector holding an index's stored vectors (flat codes, HNSW storage, one IVF list)."""
    import faiss

    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    if isinstance(inner, faiss.IndexIVF):
        return faiss.downcast_InvertedLists(inner.invlists).codes.at(0)
    return inner.codes


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_mmap_load_maps_the_vectors_and_searches_the_same(tmp_path: Path, index_type: str) -> None:
    """A memory-mapped load keeps the stored vectors in the file's pages (FAISS does not own a copy), for
    flat indexes too: FAISS's plain IO_FLAG_MMAP maps IVF lists only and would read a flat index whole."""
    vectors = clustered(1500, 16, seed=7)
    index = publish(tmp_path, vectors, index_type=index_type, tune_queries=50)
    mapped = load_index(tmp_path, mmap=True, verify=False)
    assert not _stored_codes(mapped.faiss_index).is_owned
    assert _stored_codes(fx.to_cpu(index.faiss_index)).is_owned
    queries = clustered(4, 16, seed=8)
    np.testing.assert_array_equal(mapped.search_ids(queries, 7)[1], index.search_ids(queries, 7)[1])


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_load_refuses_nonfinite_vectors_of_approximate_indexes(tmp_path: Path, index_type: str) -> None:
    """IVF-Flat and HNSW-Flat vectors are read back and checked; FAISS silently drops a NaN vector from an
    IVF index's lists (still counting it), which is refused too."""
    import faiss
    from transresnet.index import store
    from transresnet.index.store import IndexLoadError

    vectors = clustered(2000, 16, seed=9)
    index = publish(tmp_path, vectors, index_type=index_type, tune_queries=50)
    poisoned = vectors.copy()
    poisoned[7] = np.nan
    poisoned[11, 3] = np.inf
    raw = faiss.clone_index(fx.to_cpu(index.faiss_index))
    raw.reset()
    raw.add(poisoned)
    path = index.path / store.INDEX_FILE
    faiss.write_index(raw, str(path))
    manifest = dict(index.manifest, files={**index.manifest["files"], store.INDEX_FILE: store.file_entry(path)})
    store.write_json(index.path / store.MANIFEST_FILE, manifest)
    with pytest.raises(IndexLoadError, match=r"NaN or infinite vectors in 2 of 2000 rows \(rows 7, 11; "
                                             r"caption ids 'c7', 'c11'\)"):
        load_index(tmp_path)


def test_search_never_returns_a_nan_score(tmp_path: Path) -> None:
    vectors = clustered(300, 8, seed=10)
    index = publish(tmp_path, vectors)
    view = fx.flat_vectors(index.faiss_index)
    view[5] = np.nan  # damaged in memory after the load-time check
    queries = clustered(20, 8, seed=11)
    for batch in (queries[:1], queries):  # the BLAS path and FAISS's
        scores, ids = index.search_ids(batch, 10)
        assert not np.isnan(scores).any() and 5 not in ids
        hits = index.search(batch, 10)
        assert all(not np.isnan(h.score) for row in hits for h in row)
        assert all(h.row != 5 for row in hits for h in row)


def test_unaligned_flat_views_are_left_to_faiss() -> None:
    """A memory-mapped flat index's vectors may start at an odd byte offset; numpy would multiply such a
    view without BLAS, so the search goes through FAISS instead (here the view holds other vectors, so
    only FAISS's answer matches the index)."""
    import faiss

    vectors = clustered(300, 16, seed=11)
    index = faiss.IndexFlatIP(16)
    index.add(vectors)
    raw = np.zeros(300 * 16 * 4 + 1, dtype=np.uint8)
    unaligned = raw[1:].view(np.float32).reshape(300, 16)
    unaligned[:] = clustered(300, 16, seed=12)
    assert not unaligned.flags.aligned
    queries = clustered(3, 16, seed=13)
    np.testing.assert_array_equal(fx.search(index, queries, 5, flat_view=unaligned)[1], index.search(queries, 5)[1])
    aligned = unaligned.copy()  # a fresh, aligned buffer: BLAS scores it (the other vectors win)
    np.testing.assert_array_equal(fx.search(index, queries, 5, flat_view=aligned)[1],
                                  fx.blas_topk(aligned, queries, 5)[1])
