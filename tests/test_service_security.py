"""Admin access that cannot be opened by accident, reload paths confined to allowed roots, log lines that
user input cannot forge, and security headers on the page, the API and the docs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.helpers import ADMIN_TOKEN

BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def make_client(settings, **update) -> TestClient:
    from transresnet.service.main import create_app

    return TestClient(create_app(settings.model_copy(update=update)), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(service_settings):
    with make_client(service_settings) as test_client:
        yield test_client


# ------------------------------------------------------------------------------------------ admin token

@pytest.mark.parametrize("token", ["", "   ", "\t\n"])
def test_blank_admin_token_disables_admin(service_settings, token, monkeypatch, caplog):
    from transresnet.service.settings import ServiceSettings

    monkeypatch.setenv("TRANSRESNET_ADMIN_TOKEN", token)
    settings = ServiceSettings(_env_file=None, checkpoint=service_settings.checkpoint,
                               index_root=service_settings.index_root, device="cpu")
    assert settings.admin_token is None and not settings.admin_enabled
    with caplog.at_level(logging.INFO, logger="transresnet.service.main"), make_client(settings) as other:
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Basic Og=="},
                        {"Authorization": f"Bearer {token}"}):
            response = other.post("/v1/admin/reload", headers=headers)
            assert response.status_code == 403, response.text
            assert response.json()["error"] == "admin_disabled"
    assert any("admin endpoints disabled" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("authorization", [
    "Basic " + __import__("base64").b64encode(f"admin:{ADMIN_TOKEN}".encode()).decode(),
    f"Token {ADMIN_TOKEN}",
    ADMIN_TOKEN,
    f"Bearer{ADMIN_TOKEN}",
    f"Bearer {ADMIN_TOKEN}x",
    "Bearer ",
])
def test_only_the_exact_bearer_token_is_accepted(client, authorization):
    response = client.post("/v1/admin/reload", headers={"Authorization": authorization})
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"


def test_startup_log_says_admin_enabled_and_roots(service_settings, caplog):
    with caplog.at_level(logging.INFO, logger="transresnet.service.main"), make_client(service_settings):
        pass
    [line] = [r.getMessage() for r in caplog.records if "admin endpoints enabled" in r.getMessage()]
    assert str(Path(service_settings.checkpoint).resolve().parent) in line


# ------------------------------------------------------------------------------------------ reload paths

def test_default_reload_roots_are_the_served_directories(service_settings):
    roots = service_settings.effective_reload_roots
    assert Path(service_settings.checkpoint).resolve().parent in roots
    assert Path(service_settings.index_root).resolve() in roots
    assert Path(service_settings.index_root).resolve().parent not in roots


def _reload(client, checkpoint: str):
    return client.post("/v1/admin/reload", headers=BEARER, json={"checkpoint": checkpoint})


def test_reload_outside_roots_is_403_whether_or_not_it_exists(client, tmp_path_factory, tiny_checkpoint):
    outside = tmp_path_factory.mktemp("elsewhere")
    real_copy = outside / "best"
    real_copy.symlink_to(tiny_checkpoint.path, target_is_directory=True)  # a real checkpoint, outside
    existing = _reload(client, str(outside))
    missing = _reload(client, str(outside / "no-such-dir"))
    assert existing.status_code == missing.status_code == 403
    assert existing.json() == missing.json()
    assert existing.json()["error"] == "reload_path_forbidden"
    assert "TRANSRESNET_RELOAD_ROOTS" in existing.json()["message"]
    assert _reload(client, "/etc").json() == existing.json()


def test_dotdot_and_symlinks_cannot_escape_a_root(client, service_settings, tmp_path_factory):
    root = Path(service_settings.checkpoint).resolve().parent
    elsewhere = tmp_path_factory.mktemp("escape-target")
    dotdot = _reload(client, str(root / ".." / ".." / elsewhere.name))
    assert dotdot.status_code == 403, dotdot.text
    link = root / "escape-link"
    link.symlink_to(elsewhere, target_is_directory=True)
    try:
        through_link = _reload(client, str(link))
        assert through_link.status_code == 403, through_link.text
    finally:
        link.unlink()


def test_reload_inside_roots_is_loaded(client, service_settings):
    missing = str(Path(service_settings.checkpoint).resolve().parent / "missing")
    response = _reload(client, missing)
    assert response.status_code == 409, response.text  # allowed: it is tried, then refused as not loadable
    ok = _reload(client, str(service_settings.checkpoint))
    assert ok.status_code == 200, ok.text


def test_configured_reload_roots_replace_the_default(service_settings, tmp_path):
    with make_client(service_settings, reload_roots=[tmp_path]) as other:
        response = _reload(other, str(service_settings.checkpoint))
        assert response.status_code == 403, response.text


def test_reload_roots_from_environment(monkeypatch, tmp_path):
    from transresnet.service.settings import ServiceSettings

    monkeypatch.setenv("TRANSRESNET_RELOAD_ROOTS", f'["{tmp_path}"]')
    assert ServiceSettings(_env_file=None).effective_reload_roots == [tmp_path.resolve()]


def test_newlines_in_user_input_cannot_forge_log_lines(client, service_settings, caplog):
    forged = "x\nINFO forged: reload ok"
    with caplog.at_level(logging.DEBUG):
        response = _reload(client, str(Path(service_settings.checkpoint).parent / forged))
        assert response.status_code == 403
        _reload(client, "/tmp/" + forged)
        client.get("/no-such-page%0AINFO%20forged")
    for record in caplog.records:
        assert "\n" not in record.getMessage(), record.getMessage()


# ------------------------------------------------------------------------------------------ headers

@pytest.mark.parametrize("path", ["/", "/static/app.js", "/v1/personalities", "/healthz", "/openapi.json",
                                  "/no-such-page"])
def test_security_headers_everywhere(client, path):
    response = client.get(path)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "https:" not in csp


def test_page_needs_nothing_the_csp_forbids(client):
    """No inline script, style or handler, and every asset comes from this server."""
    from transresnet.service.routers.web import STATIC_DIR

    html = (STATIC_DIR / "index.html").read_text()
    assert "<style" not in html and " style=" not in html and " on" not in html.replace(" one", "")
    for tag in __import__("re").findall(r"<script[^>]*>", html):
        assert 'src="/static/' in tag
    assert "<script>" not in html
    assert "innerHTML" not in (STATIC_DIR / "app.js").read_text()


def test_docs_csp_allows_only_the_apps_own_assets_and_its_inline_script(client):
    import base64
    import hashlib
    import re

    page = client.get("/docs")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    [script] = re.findall(r"<script>(.*?)</script>", page.text, flags=re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp
    assert "script-src 'self' 'sha256-" in csp and "http" not in csp  # no other origin: works offline
    assert client.get("/docs/oauth2-redirect").status_code == 200
    for asset in re.findall(r'(?:src|href)="(/static/docs/[^"]+)"', page.text):
        assert client.get(asset).status_code == 200, asset
    redoc = client.get("/redoc")
    assert redoc.status_code == 200 and "/static/docs/redoc.standalone.js" in redoc.text
    assert "fonts.googleapis" not in redoc.text


def test_header_count_limit_is_431(service_settings):
    with make_client(service_settings, max_headers=20) as other:
        headers = {f"x-h{i}": "v" for i in range(30)}
        response = other.get("/healthz", headers=headers)
        assert response.status_code == 431, response.text
        assert response.json()["error"] == "headers_too_large"
        assert other.get("/healthz").status_code == 200


assert os.environ.get("HF_HUB_OFFLINE") == "1"
