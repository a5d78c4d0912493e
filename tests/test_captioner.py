"""The Python API ranks like the service, for every kind of photo, one at a time or in batches."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, image_bytes, reference_ranking
from transresnet import Captioner
from transresnet.checkpoint import Checkpoint
from transresnet.traits import UnknownTraitError


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Checkpoint, service_index_root: Path) -> Captioner:
    return Captioner.load(tiny_checkpoint.path, service_index_root, device="cpu")


def _ids_scores(rankings) -> list[list[tuple[str, float]]]:
    return [[(c.id, c.score) for c in r.captions] for r in rankings]


def _assert_close(got: list[list[tuple[str, float]]], expected: list[list[tuple[str, float]]]) -> None:
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in expected]
    np.testing.assert_allclose([s for r in got for _, s in r], [s for r in expected for _, s in r],
                               rtol=1e-4, atol=1e-4)


def test_every_kind_of_photo_ranks_like_the_service_reference(captioner: Captioner, tiny_checkpoint: Checkpoint,
                                                              service_index_root: Path, tmp_path: Path) -> None:
    data = image_bytes("PNG", seed=7)
    expected = reference_ranking(tiny_checkpoint, service_index_root, data, ["Sweet", "Sarcastic"], 4)
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    pil = Image.open(io.BytesIO(data))
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for photo in (path, str(path), data, pil, array):
        rankings = captioner.rank(photo, ["Sweet", "Sarcastic"], k=4)
        assert [r.personality for r in rankings] == ["Sweet", "Sarcastic"]
        _assert_close(_ids_scores(rankings), expected)


def test_a_batch_equals_photos_one_by_one(captioner: Captioner) -> None:
    photos = [image_bytes(seed=seed) for seed in range(3)]
    batched = captioner.rank(photos, ["sweet", "none"], k=3)
    assert len(batched) == 3
    for photo, rankings in zip(photos, batched, strict=True):
        assert [r.personality for r in rankings] == ["Sweet", "none"]
        _assert_close(_ids_scores(rankings), _ids_scores(captioner.rank(photo, ["Sweet", "none"], k=3)))


def test_bad_input_says_what_to_fix(captioner: Captioner) -> None:
    with pytest.raises(UnknownTraitError, match="closest"):
        captioner.rank(image_bytes(), "Sweeet")
    with pytest.raises(TypeError, match="pass a path, bytes"):
        captioner.rank(12345, "Sweet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        captioner.rank(np.zeros((4, 4, 3), dtype=np.float32), "Sweet")


def test_the_readme_example_runs(tiny_checkpoint: Checkpoint, service_index_root: Path, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- python-api-example -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README.md lost its Python API example"
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes())
    code = (block.group(1).replace('"runs/flickr8k/best"', repr(str(tiny_checkpoint.path)))
            .replace('"indexes/flickr8k"', repr(str(service_index_root))).replace('"photo.jpg"', repr(str(photo))))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["Sweet", "Sarcastic"]
