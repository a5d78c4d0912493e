"""A real uvicorn server (in a thread) under concurrent load: micro-batched answers equal unbatched ones,
and reloads under load (new index versions, a mismatched one, a corrupt one) fail no request."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.helpers import (
    ADMIN_TOKEN,
    ServerThread,
    assert_same_ranking,
    build_test_index,
    free_port,
    image_bytes,
    reference_ranking,
    service_captions,
)

TRAIT_SETS = (["Sweet"], ["Sarcastic", "none"], ["angry", "Cheerful", "sweet"], ["Cheerful"])


@pytest.fixture(scope="module")
def load_index_root(tiny_checkpoint, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("load_index")
    build_test_index(tiny_checkpoint, root)
    return root


@pytest.fixture(scope="module")
def server(tiny_checkpoint, load_index_root) -> Iterator[ServerThread]:
    from transresnet.service.main import create_app
    from transresnet.service.settings import ServiceSettings

    settings = ServiceSettings(_env_file=None, checkpoint=tiny_checkpoint.path, index_root=load_index_root,
                               admin_token=ADMIN_TOKEN, max_batch=16, max_wait_ms=20.0, device="cpu")
    with ServerThread(create_app(settings), free_port()) as running:
        yield running


def post(client: httpx.Client, data: bytes, traits: list[str], k: int = 5) -> httpx.Response:
    files = {"image": ("photo.jpg", data, "image/jpeg")}
    return client.post("/v1/captions", files=files, data={"personality": traits, "k": str(k)})


def test_concurrent_requests_are_batched_and_match_unbatched(server, tiny_checkpoint, load_index_root):
    images = [image_bytes(seed=seed) for seed in range(12)]
    jobs = [(images[i % len(images)], TRAIT_SETS[i % len(TRAIT_SETS)], 3 + i % 3) for i in range(64)]
    expected = {(i % len(images), tuple(traits), k): reference_ranking(tiny_checkpoint, load_index_root,
                                                                         images[i % len(images)], traits, k)
                for i, (_, traits, k) in enumerate(jobs)}
    local = threading.local()

    def send(i: int) -> tuple[int, dict]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=server.base_url, timeout=60)
        data, traits, k = jobs[i]
        response = post(local.client, data, traits, k)
        assert response.status_code == 200, response.text
        return i, response.json()

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(send, range(len(jobs))))
    for i, body in answers:
        _, traits, k = jobs[i]
        assert_same_ranking(body, expected[(i % len(images), tuple(traits), k)])
    assert max(body["timings"]["encode_batch_size"] for _, body in answers) > 1, "nothing was batched"


def _second_checkpoint(tiny_config, folder: Path):
    """A checkpoint with other text weights: its fingerprint matches no index built for the first."""
    from transresnet.checkpoint import load_checkpoint, save_checkpoint
    from transresnet.model import create_model
    from transresnet.traits import TraitVocab

    torch.manual_seed(123)
    model = create_model(tiny_config.model, TraitVocab(["Sarcastic", "Sweet", "Angry", "Cheerful"]))
    return load_checkpoint(save_checkpoint(model, tiny_config, folder))


def _corrupt_newest_version(root: Path, checkpoint) -> Path:
    version = build_test_index(checkpoint, root)
    largest = max((p for p in version.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(b"\0garbage" * 16)
    return version


def test_reload_under_load_drops_nothing(server, tiny_checkpoint, tiny_config, load_index_root, tmp_path):
    stop = threading.Event()
    outcomes: Counter = Counter()
    versions: set[str] = set()
    data = image_bytes(seed=7)

    def keep_sending() -> None:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            while not stop.is_set():
                response = post(client, data, ["Sweet", "Angry"])
                outcomes[response.status_code] += 1
                if response.status_code == 200:
                    versions.add(response.json()["index"]["version"])

    admin = httpx.Client(base_url=server.base_url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    senders = [threading.Thread(target=keep_sending) for _ in range(6)]
    for thread in senders:
        thread.start()
    try:
        swapped = []
        for round_ in range(3):
            captions = service_captions() + [f"Extra caption number {round_}."]
            build_test_index(tiny_checkpoint, load_index_root, captions)
            response = admin.post("/v1/admin/reload")
            assert response.status_code == 200, response.text
            swapped.append(response.json()["index"]["version"])
            assert response.json()["index"]["size"] == 41
            time.sleep(0.3)
        # An index built by another checkpoint, then a corrupt one: refused, the last good one keeps serving.
        other = _second_checkpoint(tiny_config, tmp_path / "other")
        build_test_index(other, load_index_root)
        mismatched = admin.post("/v1/admin/reload")
        assert mismatched.status_code == 409 and mismatched.json()["error"] == "reload_failed", mismatched.text
        _corrupt_newest_version(load_index_root, tiny_checkpoint)
        corrupt = admin.post("/v1/admin/reload")
        assert corrupt.status_code == 409, corrupt.text
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in senders:
            thread.join(60)
        admin.close()
    assert set(outcomes) == {200}, outcomes
    assert outcomes[200] > 20
    assert len(set(swapped)) == 3 and set(swapped) <= versions
    with httpx.Client(base_url=server.base_url) as client:
        assert client.get("/readyz").json()["index"]["version"] == swapped[-1]
