"""Fixtures and helpers shared by the service tests (imported by each tests/test_service_*.py module).

The served model is the tiny random checkpoint from conftest; the index holds a few dozen captions.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transresnet.checkpoint import Checkpoint

ADMIN_TOKEN = "test-admin-token"
SUBJECTS = ("a dog", "two cats", "a red car", "the beach", "a birthday cake", "an old bridge", "a city street",
            "three kids", "a mountain lake", "a bowl of soup")
VOICES = {
    "Sarcastic": "Oh great, {} again. How thrilling.",
    "Sweet": "Aww, look at {}, how lovely!",
    "Angry": "I can't stand {}, get it out of here!",
    "Cheerful": "What a happy day with {}!",
}


def service_captions() -> list[str]:
    """Forty distinct captions: ten subjects in each tiny-model voice."""
    return [template.format(subject) for template in VOICES.values() for subject in SUBJECTS]


def build_test_index(checkpoint: Checkpoint, root: Path, captions: list[str] | None = None) -> Path:
    """Build and publish a new index version under the index root ``root``; returns the version dir."""
    from index import BuildOptions, build_index
    from index.captions import collect

    table = collect({"caption": text} for text in (captions or service_captions()))
    return Path(build_index(checkpoint, table, root, BuildOptions(keep=10), progress=False))


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (48, 40), seed: int = 0) -> bytes:
    """A small random-noise photo (distinct per seed, so rankings differ between images)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reference_ranking(checkpoint: Checkpoint, index_path: Path, data: bytes, traits: list[str],
                      k: int) -> list[list[tuple[str, float]]]:
    """What the service must answer, computed one request at a time with no batching or threads."""
    from index import load_index
    from transresnet.images import ImagePreprocessor, open_rgb

    caption_index = load_index(index_path, checkpoint=checkpoint)
    pixels = ImagePreprocessor(checkpoint.config.model.image)(open_rgb(data))[None]
    rankings = []
    with torch.inference_mode():
        for trait in traits:
            slot = checkpoint.traits.lookup(trait)
            query = checkpoint.model.encode_query(images=pixels, trait_ids=torch.tensor([slot]))
            hits = caption_index.search(query.numpy().astype(np.float32), k)[0]
            rankings.append([(h.id, float(h.score)) for h in hits])
    return rankings


def assert_same_ranking(body: dict, expected: list[list[tuple[str, float]]]) -> None:
    assert len(body["results"]) == len(expected)
    for result, reference in zip(body["results"], expected, strict=True):
        assert [c["id"] for c in result["captions"]] == [i for i, _ in reference]
        np.testing.assert_allclose([c["score"] for c in result["captions"]], [s for _, s in reference],
                                   rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="session")
def service_index_root(tiny_checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("service_index")
    build_test_index(tiny_checkpoint, root)
    return root


@pytest.fixture(scope="session")
def service_settings(tiny_checkpoint: Checkpoint, service_index_root: Path):
    from service.settings import ServiceSettings

    return ServiceSettings(_env_file=None, checkpoint=tiny_checkpoint.path, index_root=service_index_root,
                           admin_token=ADMIN_TOKEN, max_upload_bytes=256 * 1024, max_pixels=2_000_000,
                           max_wait_ms=2.0, device="cpu")


@pytest.fixture(scope="module")
def service_client(service_settings) -> Iterator:
    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app(service_settings), raise_server_exceptions=False) as test_client:
        yield test_client


class ServerThread:
    """uvicorn serving an app on a loopback port from a background thread."""

    def __init__(self, app, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
