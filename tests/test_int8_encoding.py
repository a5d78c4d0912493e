"""int8 caption encoding (the text transformer in ONNX Runtime, dynamically quantised) against float32.

On the tiny random checkpoint: vectors within ``MIN_COSINE_INT8`` of float32, the same index rankings for
most queries, exports cached by text fingerprint and rebuilt when corrupted, and "auto" never choosing a
precision that fails its check.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import build_test_index, service_captions
from transresnet import encode as enc
from transresnet import onnx_text
from transresnet.checkpoint import META, Checkpoint, text_fingerprint

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")

CAPTIONS = [*service_captions(), "a dog", "x", "", "two children play in the snow near a red house",
            "people at a market selling fruit, bread and fish while it rains"]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def encode(model, precision: str, cache: Path, texts: list[str] = CAPTIONS) -> np.ndarray:
    return enc.encode_captions(model, texts, batch_size=8, precision=precision, progress=False, cache_dir=cache)


def test_int8_vectors_within_the_cosine_bound(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    model = tiny_checkpoint.model
    exact = encode(model, "float32", tmp_path)
    int8 = encode(model, "int8", tmp_path)
    assert int8.dtype == np.float32 and int8.shape == exact.shape
    assert cosines(int8, exact).min() >= enc.MIN_COSINE_INT8
    assert not np.array_equal(int8, exact)  # really another path, not float32 again
    # Batching and order do not change a caption's vector (same tokens, pooling and head as float32).
    one_by_one = np.concatenate([encode(model, "int8", tmp_path, [c]) for c in CAPTIONS[:6]])
    np.testing.assert_allclose(one_by_one, int8[:6], atol=2e-3)


def test_int8_index_ranks_like_float32(tiny_checkpoint: Checkpoint, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Bound: over 64 queries, the top-1 caption is the same for at least 90% of them and the top-5 sets
    share at least 4 of 5 captions on average."""
    from transresnet.index import load_index

    monkeypatch.setenv(onnx_text.CACHE_ENV, str(tmp_path / "cache"))
    model = tiny_checkpoint.model
    exact_root, int8_root = tmp_path / "float32", tmp_path / "int8"
    build_test_index(tiny_checkpoint, exact_root, index_type="flat", precision="float32")
    build_test_index(tiny_checkpoint, int8_root, index_type="flat", precision="int8")
    exact_index = load_index(exact_root, checkpoint=tiny_checkpoint)
    int8_index = load_index(int8_root, checkpoint=tiny_checkpoint)
    assert int8_index.manifest["encoding"]["precision"] == "int8"
    torch.manual_seed(1)
    features = torch.randn(64, model.backbone.num_features)
    queries = enc.encode_queries(model, torch.arange(64) % len(tiny_checkpoint.traits), features=features)
    exact_hits = exact_index.search(queries, 5)
    int8_hits = int8_index.search(queries, 5)
    top1 = np.mean([e[0].id == i[0].id for e, i in zip(exact_hits, int8_hits, strict=True)])
    overlap = np.mean([len({h.id for h in e} & {h.id for h in i}) for e, i in zip(exact_hits, int8_hits, strict=True)])
    assert top1 >= 0.9 and overlap >= 4.0, (top1, overlap)


def test_export_is_cached_by_fingerprint(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    model = tiny_checkpoint.model
    first = onnx_text.load_int8_transformer(model, cache_dir=tmp_path)
    meta = json.loads((first.folder / META).read_text())
    assert meta["key"]["fingerprint"] == text_fingerprint(model) == tiny_checkpoint.fingerprint
    assert {"torch", "onnx", "onnxruntime"} <= set(meta["key"])
    stamp = (first.folder / onnx_text.MODEL_FILE).stat().st_mtime_ns
    assert onnx_text.load_int8_transformer(model, cache_dir=tmp_path).folder == first.folder
    assert (first.folder / onnx_text.MODEL_FILE).stat().st_mtime_ns == stamp  # read, not exported again

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.text.transformer.encoder.layer[0].intermediate.dense.weight.mul_(1.5)
    second = onnx_text.load_int8_transformer(changed, cache_dir=tmp_path)
    assert second.folder != first.folder
    assert json.loads((second.folder / META).read_text())["key"]["fingerprint"] == text_fingerprint(changed)
    # Each export serves its own weights: the changed model's int8 vectors follow the changed float32 ones.
    assert cosines(encode(changed, "int8", tmp_path), encode(changed, "float32", tmp_path)).min() >= 0.99
    assert (first.folder / onnx_text.MODEL_FILE).stat().st_mtime_ns == stamp


def test_export_recipe_version_is_part_of_the_key(tiny_checkpoint: Checkpoint, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    before, _ = onnx_text.export_folder(tiny_checkpoint.model, tmp_path)
    monkeypatch.setattr(onnx_text, "EXPORT_VERSION", onnx_text.EXPORT_VERSION + 1)
    after, key = onnx_text.export_folder(tiny_checkpoint.model, tmp_path)
    assert after != before and key["export_version"] == onnx_text.EXPORT_VERSION


@pytest.mark.parametrize("damage", ["model", "meta"])
def test_corrupted_cache_is_exported_again(tiny_checkpoint: Checkpoint, tmp_path: Path, damage: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_checkpoint.model
    folder = onnx_text.load_int8_transformer(model, cache_dir=tmp_path).folder
    good = encode(model, "int8", tmp_path)
    target = folder / (onnx_text.MODEL_FILE if damage == "model" else META)
    data = bytearray(target.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64
    target.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="transresnet.onnx_text"):
        again = onnx_text.load_int8_transformer(model, cache_dir=tmp_path)
    assert "exporting it again" in caplog.text
    meta = json.loads((folder / META).read_text())
    assert again.folder == folder and meta["sha256"] == onnx_text.sha256_file(folder / onnx_text.MODEL_FILE)
    np.testing.assert_allclose(encode(model, "int8", tmp_path), good, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_default_cache_is_beside_the_checkpoint_or_where_the_user_says(tiny_checkpoint: Checkpoint, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_checkpoint.model
    monkeypatch.delenv(onnx_text.CACHE_ENV, raising=False)
    assert onnx_text.cache_root(model) == Path(tiny_checkpoint.path) / "encoders"
    monkeypatch.setenv(onnx_text.CACHE_ENV, str(tmp_path))
    assert onnx_text.cache_root(model) == tmp_path
    assert onnx_text.cache_root(model, tmp_path / "given") == tmp_path / "given"


def test_auto_never_chooses_a_failing_precision(tiny_checkpoint: Checkpoint, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_checkpoint.model
    half = ("openvino_bf16" if "openvino_bf16" in enc._candidates(model, "auto") else "bfloat16") \
        if enc._cpu_has_bf16() else "float32"
    monkeypatch.setattr(enc, "MIN_COSINE", 1.01)  # every half precision fails its check
    monkeypatch.setattr(enc, "MIN_COSINE_INT8", -1.0)
    assert enc.choose_precision(model, CAPTIONS, "auto", cache_dir=tmp_path) == "int8"
    monkeypatch.setattr(enc, "MIN_COSINE_INT8", 1.01)  # and now int8 too
    assert enc.choose_precision(model, CAPTIONS, "auto", cache_dir=tmp_path) == "float32"
    assert enc.choose_precision(model, CAPTIONS, "int8", cache_dir=tmp_path) == "float32"  # checked, too
    monkeypatch.setattr(enc, "MIN_COSINE", -1.0)
    assert enc.choose_precision(model, CAPTIONS, "auto", cache_dir=tmp_path) == half


def test_without_the_onnx_extra(tiny_checkpoint: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_checkpoint.model
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what find_spec sees when it is not installed
    assert "int8" not in enc._candidates(model, "auto")
    assert enc.choose_precision(model, CAPTIONS, "auto", cache_dir=tmp_path) in ("float32", "bfloat16")
    with pytest.raises(ImportError, match=r"transresnet\[onnx\]"):
        encode(model, "int8", tmp_path)


def test_int8_needs_a_transformer_text_encoder(tiny_config, tmp_path: Path) -> None:
    from transresnet.model import create_model
    from transresnet.traits import TraitVocab

    config = tiny_config.model.model_copy(update={"text": tiny_config.model.text.model_copy(update={"kind": "bow"})})
    model = create_model(config, TraitVocab(["Sweet"]), captions=CAPTIONS)
    assert "int8" not in enc._candidates(model, "auto")
    with pytest.raises(ValueError, match="bag of words"):
        encode(model, "int8", tmp_path)


needs_openvino_bf16 = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or not enc._cpu_has_bf16(),
    reason="needs the openvino extra and a CPU with native bfloat16")


@needs_openvino_bf16
def test_openvino_bf16_vectors_match_float32_and_auto_tries_it_first(tiny_checkpoint: Checkpoint,
                                                                     tmp_path: Path) -> None:
    model = tiny_checkpoint.model
    exact = encode(model, "float32", tmp_path)
    got = encode(model, "openvino_bf16", tmp_path)
    assert got.shape == exact.shape and got.dtype == np.float32
    assert cosines(got, exact).min() >= enc.MIN_COSINE
    assert enc._candidates(model, "auto")[0] == "openvino_bf16"
    assert [p.name.split("-")[:2] for p in tmp_path.iterdir()] == [["text", "float"]]
    again = encode(model, "openvino_bf16", tmp_path)  # from the cached export
    np.testing.assert_allclose(again, got, rtol=0, atol=1e-6)


def test_openvino_bf16_refused_with_what_to_do(tiny_checkpoint: Checkpoint, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_checkpoint.model
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ImportError, match=r"transresnet\[openvino\]"):
        encode(model, "openvino_bf16", tmp_path)
    assert "openvino_bf16" not in enc._candidates(model, "auto")
    monkeypatch.delitem(sys.modules, "openvino")
    monkeypatch.setattr(enc, "_cpu_has_bf16", lambda: False)
    if importlib.util.find_spec("openvino") is not None:
        with pytest.raises(ValueError, match="not have natively"):
            encode(model, "openvino_bf16", tmp_path)


@needs_openvino_bf16
def test_openvino_streams_keep_every_row_in_place(tiny_checkpoint: Checkpoint, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads compile two streams and keep two batches in flight; each vector still lands on its own
    caption's row (batches of 2 over the captions, so a swap would show as a cosine far from float32)."""
    import torch

    model = tiny_checkpoint.model
    texts = [f"{caption} {i}" for i, caption in enumerate(CAPTIONS * 3)]
    exact = enc.encode_captions(model, texts, batch_size=2, precision="float32", progress=False)
    runs = {}
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        plan = enc._plan(model, "openvino_bf16", tmp_path)
        assert plan.concurrency == threads and plan.transformer.model.streams == threads
        runs[threads] = enc.encode_captions(model, texts, batch_size=2, precision="openvino_bf16", progress=False,
                                            cache_dir=tmp_path)
        assert cosines(runs[threads], exact).min() >= enc.MIN_COSINE
    assert cosines(runs[2], runs[1]).min() >= 0.9999
