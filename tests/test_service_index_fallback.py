"""A server starting on an index root whose CURRENT is bad serves the newest verified version instead and
says so (log, /readyz, metrics); a reload that finds CURRENT bad keeps serving what it has."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ADMIN_TOKEN, ServerThread, build_test_index, free_port, image_bytes, service_captions
from transresnet.checkpoint import Checkpoint

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def pristine_root(tiny_checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """An index root with two good versions (the second current); copied per test, so each may damage it."""
    root = tmp_path_factory.mktemp("fallback_index")
    older = build_test_index(tiny_checkpoint, root).name
    newer = build_test_index(tiny_checkpoint, root, service_captions()[::-1]).name
    return root, older, newer


@pytest.fixture
def index_root(pristine_root: tuple[Path, str, str], tmp_path: Path) -> tuple[Path, str, str]:
    root, older, newer = pristine_root
    copy = tmp_path / "index"
    shutil.copytree(root, copy)
    return copy, older, newer


def _settings(service_settings, root: Path):
    return service_settings.model_copy(update={"index_root": root})


def _truncate(root: Path, version: str) -> None:
    path = root / "versions" / version / "index.faiss"
    path.write_bytes(path.read_bytes()[:100])


def _metric(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name)]


def test_bad_current_falls_back_loudly(service_settings, index_root, caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient
    from transresnet.service.main import create_app

    root, older, newer = index_root
    _truncate(root, newer)
    with caplog.at_level(logging.WARNING), \
            TestClient(create_app(_settings(service_settings, root)), raise_server_exceptions=False) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["index"]["version"] == older
        assert body["index_fallback"]["wanted"] == newer and body["index_fallback"]["serving"] == older
        assert "index.faiss is truncated or altered" in body["index_fallback"]["reason"]
        metrics = client.get("/metrics").text
        assert _metric(metrics, "transresnet_index_fallback ") == ["transresnet_index_fallback 1.0"]
        assert f'wanted="{newer}"' in _metric(metrics, "transresnet_index_fallback_info{")[0]
        response = client.post("/v1/captions", files={"image": ("a.jpg", image_bytes(), "image/jpeg")},
                               data={"personality": "Sweet", "k": "3"})
        assert response.status_code == 200 and response.json()["index"]["version"] == older

        reload = client.post("/v1/admin/reload", headers=AUTH)  # CURRENT is still bad: refused, old one kept
        assert reload.status_code == 409 and "still serving" in reload.json()["message"]
        assert client.get("/readyz").json()["index"]["version"] == older

        from transresnet.index.verify import rollback

        assert rollback(root, older) == (newer, older)
        reload = client.post("/v1/admin/reload", headers=AUTH)
        assert reload.status_code == 200, reload.text
        body = client.get("/readyz").json()
        assert body["index"]["version"] == older and body["index_fallback"] is None
        assert _metric(client.get("/metrics").text, "transresnet_index_fallback ") == \
            ["transresnet_index_fallback 0.0"]
        assert not _metric(client.get("/metrics").text, "transresnet_index_fallback_info{")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "FALLBACK" in r.getMessage()]
    assert len(warnings) == 1 and newer in warnings[0] and older in warnings[0] and "truncated" in warnings[0]


def test_good_current_reports_no_fallback(service_client) -> None:
    body = service_client.get("/readyz").json()
    assert body["ready"] and body["index_fallback"] is None
    assert "transresnet_index_fallback 0.0" in service_client.get("/metrics").text


@pytest.fixture
def replica(service_settings, index_root) -> Iterator[tuple[ServerThread, Path, str, str]]:
    """A real uvicorn on loopback started after CURRENT was pointed outside versions/."""
    from transresnet.service.main import create_app

    root, older, newer = index_root
    (root / "CURRENT").write_text("../../etc\n")
    shutil.rmtree(root / "versions" / newer)  # and the newest version is gone as well
    with ServerThread(create_app(_settings(service_settings, root)), free_port()) as server:
        yield server, root, older, newer


def test_following_replica_falls_back_over_http(replica) -> None:
    server, root, older, _ = replica
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        body = client.get("/readyz").json()
        assert body["index"]["version"] == older
        assert body["index_fallback"] == {"wanted": "../../etc", "serving": older,
                                          "reason": "CURRENT holds '../../etc', which is a path, not a version name"}


def test_no_verified_version_refuses_to_start(service_settings, index_root) -> None:
    from fastapi.testclient import TestClient
    from transresnet.index.store import IndexLoadError
    from transresnet.service.main import create_app

    root, older, newer = index_root
    _truncate(root, newer)
    _truncate(root, older)
    with pytest.raises(IndexLoadError, match="no other version verifies either"), \
            TestClient(create_app(_settings(service_settings, root))):
        pass
