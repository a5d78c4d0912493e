"""The shared caption-encoding path: same vectors as model.encode_text, in input order, any batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transresnet import encode as enc
from transresnet.checkpoint import Checkpoint

CAPTIONS = ["a dog", "a very small brown dog runs across the wide green field", "two cats",
            "the man rides a bike down the hill", "x", "people at a market selling fruit and bread", "a dog",
            "children play in the snow", "", "sunset over the sea with boats"]


def test_matches_encode_text_one_by_one(tiny_checkpoint: Checkpoint) -> None:
    model = tiny_checkpoint.model
    vectors = enc.encode_captions(model, CAPTIONS, batch_size=3, precision="float32", progress=False)
    with torch.inference_mode():
        reference = torch.cat([model.encode_text([c]) for c in CAPTIONS]).numpy()
    assert vectors.dtype == np.float32 and vectors.shape == (len(CAPTIONS), model.embed_dim)
    np.testing.assert_allclose(vectors, reference, rtol=1e-4, atol=1e-5)


def test_length_batches_cover_everything_once() -> None:
    lengths = np.array([5, 3, 5, 9, 3, 3, 5, 5, 5, 7, 2, 5, 5, 5])
    batches = list(enc.length_batches(lengths, 4))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 4 for b in batches)
    assert np.all(np.diff(lengths[flat]) >= 0)  # sorted by length
    assert sum(len(set(lengths[b])) == 1 for b in batches) >= len(batches) - 2  # mostly unpadded


def test_reduced_precision_outside_tolerance_falls_back(tiny_checkpoint: Checkpoint,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_checkpoint.model
    assert enc.choose_precision(model, CAPTIONS, "float32") == "float32"
    monkeypatch.setattr(enc, "MIN_COSINE", 1.01)  # nothing is within this tolerance
    assert enc.choose_precision(model, CAPTIONS, "bfloat16") == "float32"
    monkeypatch.setattr(enc, "MIN_COSINE", -1.0)
    assert enc.choose_precision(model, CAPTIONS, "bfloat16") == "bfloat16"
    close = enc.encode_captions(model, CAPTIONS, precision="bfloat16", progress=False)
    exact = enc.encode_captions(model, CAPTIONS, precision="float32", progress=False)
    cosine = (close * exact).sum(1) / np.linalg.norm(close, axis=1) / np.linalg.norm(exact, axis=1)
    assert cosine.min() > 0.99
    with pytest.raises(ValueError, match="unknown precision"):
        enc.encode_captions(model, CAPTIONS, precision="int4")


def test_restores_training_mode_and_encodes_queries(tiny_checkpoint: Checkpoint) -> None:
    model = tiny_checkpoint.model
    model.train()
    try:
        first = enc.encode_captions(model, CAPTIONS[:3], precision="float32", progress=False)
        second = enc.encode_captions(model, CAPTIONS[:3], precision="float32", progress=False)
        assert model.training
        np.testing.assert_array_equal(first, second)  # dropout was off while encoding
    finally:
        model.eval()
    features = torch.randn(2, model.backbone.num_features)
    queries = enc.encode_queries(model, [1, 2], features=features)
    with torch.inference_mode():
        expected = model.encode_query(trait_ids=torch.tensor([1, 2]), features=features).numpy()
    np.testing.assert_allclose(queries, expected, rtol=1e-5, atol=1e-6)
    assert enc.encode_captions(model, [], progress=False).shape == (0, model.embed_dim)
