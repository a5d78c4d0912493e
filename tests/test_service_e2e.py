"""End to end: `transresnet serve` in its own process on a free loopback port, spoken to over HTTP."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transresnet.service.readiness import wait_until_ready

from tests.helpers import (
    ADMIN_TOKEN,
    assert_same_ranking,
    free_port,
    image_bytes,
    reference_ranking,
    stop_server_process,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server_process(tiny_checkpoint, service_index_root, tmp_path_factory) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "TRANSRESNET_ADMIN_TOKEN": ADMIN_TOKEN, "TRANSRESNET_MAX_WAIT_MS": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "transresnet", "serve", "--checkpoint", str(tiny_checkpoint.path),
               "--index", str(service_index_root), "--port", str(port), "--threads", "1", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=tmp_path_factory.mktemp("serve_cwd"), env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ready(base_url, process)
        except RuntimeError as err:
            output = process.stdout.read()[-3000:] if process.poll() is not None else ""
            raise RuntimeError(f"{err}\n{output}") from None
        yield base_url
    finally:
        stop_server_process(process)


def test_real_server_answers(server_process, tiny_checkpoint, service_index_root):
    data = image_bytes(seed=11)
    with httpx.Client(base_url=server_process, timeout=30) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        names = [p["name"] for p in client.get("/v1/personalities").json()["personalities"]]
        assert names == tiny_checkpoint.traits.names
        form = client.post("/v1/captions", files={"image": ("a.jpg", data, "image/jpeg")},
                           data={"personality": ["Sweet", "sarcastic"], "k": "4"})
        assert form.status_code == 200, form.text
        expected = reference_ranking(tiny_checkpoint, service_index_root, data, ["Sweet", "sarcastic"], 4)
        assert_same_ranking(form.json(), expected)
        as_json = client.post("/v1/captions", json={"image_base64": base64.b64encode(data).decode(),
                                                    "personality": ["Sweet", "sarcastic"], "k": 4})
        assert as_json.status_code == 200 and as_json.json()["results"] == form.json()["results"]
        bad = client.post("/v1/captions", files={"image": ("a.jpg", b"nope", "image/jpeg")},
                          data={"personality": "Sweet"})
        assert bad.status_code == 422 and "image" in bad.json()["message"]
        unauthorized = client.post("/v1/admin/reload")
        assert unauthorized.status_code == 401
        reload = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert reload.status_code == 200, reload.text
        metrics = client.get("/metrics").text
        assert 'transresnet_stage_seconds_count{stage="encode"} 2.0' in metrics
        assert client.get("/").status_code == 200
