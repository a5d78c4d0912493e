"""The embedded demo: `transresnet serve` with nothing configured builds a synthetic pair once and reuses it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from tests.helpers import image_bytes


def _serve_args(**flags) -> argparse.Namespace:
    from transresnet.cli.serve import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    argv = ["serve"] + [item for key, value in flags.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    return parser.parse_args(argv)


def test_serve_without_configuration_uses_demo(monkeypatch, tiny_checkpoint, service_index_root, tmp_path,
                                               caplog):
    import transresnet.service.demo
    import uvicorn

    from transresnet.cli.serve import _serve

    for name in ("TRANSRESNET_CHECKPOINT", "TRANSRESNET_INDEX_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    asked: list[Path] = []
    monkeypatch.setattr(transresnet.service.demo, "ensure_demo",
                        lambda folder: asked.append(folder) or (tiny_checkpoint.path, service_index_root))
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    with caplog.at_level(logging.INFO):
        assert _serve(_serve_args(port=8123)) == 0
    assert asked == [Path(".cache/demo")]
    assert served["host"] == "127.0.0.1" and served["port"] == 8123
    settings = served["app"].state.settings
    assert settings.checkpoint == tiny_checkpoint.path and settings.index_root == service_index_root
    assert "http://127.0.0.1:8123/" in caplog.text and "curl -F image=@" in caplog.text


def test_serve_refuses_half_configuration(monkeypatch, tmp_path):
    from transresnet.cli.serve import _serve

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRANSRESNET_INDEX_ROOT", raising=False)
    with pytest.raises(ValueError, match="both"):
        _serve(_serve_args(checkpoint=tmp_path))
    with pytest.raises(FileNotFoundError, match="transresnet train"):
        _serve(_serve_args(checkpoint=tmp_path / "missing", index=tmp_path))


def test_cached_demo_is_reused(monkeypatch, tmp_path, tiny_checkpoint, service_index_root):
    import json

    import transresnet.service.demo as demo

    (tmp_path / demo.MARKER).write_text(json.dumps({"checkpoint": str(tiny_checkpoint.path),
                                                    "index_root": str(service_index_root)}))
    monkeypatch.setattr(demo, "build_demo", lambda *a, **k: pytest.fail("the cached demo was rebuilt"))
    assert demo.ensure_demo(tmp_path) == (tiny_checkpoint.path, service_index_root)


@pytest.mark.slow
def test_demo_builds_once_and_serves(tmp_path, monkeypatch):
    """The real pipeline (synthetic data -> train configs/synthetic.yaml -> index), kept small."""
    import transresnet.service.demo as demo
    from fastapi.testclient import TestClient
    from transresnet.service.main import create_app
    from transresnet.service.settings import ServiceSettings

    small = {"num_images": 150, "overrides": ["train.epochs=1", "train.batch_size=50"]}
    checkpoint, index_root = demo.ensure_demo(tmp_path / "demo", **small)
    monkeypatch.setattr(demo, "build_demo", lambda *a, **k: pytest.fail("the cached demo was rebuilt"))
    assert demo.ensure_demo(tmp_path / "demo", **small) == (checkpoint, index_root)

    settings = ServiceSettings(_env_file=None, checkpoint=checkpoint, index_root=index_root)
    with TestClient(create_app(settings)) as client:
        names = [p["name"] for p in client.get("/v1/personalities").json()["personalities"]]
        assert "Sarcastic" in names
        response = client.post("/v1/captions", files={"image": ("a.jpg", image_bytes(size=(64, 64)), "image/jpeg")},
                               data={"personality": ["Sarcastic", "Sweet"], "k": "3"})
        assert response.status_code == 200, response.text
        assert [len(r["captions"]) for r in response.json()["results"]] == [3, 3]
