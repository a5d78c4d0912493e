"""GET /: the single-page demo (plain HTML/JS from service/static, no build step); GET /docs and GET /redoc:
Swagger UI and ReDoc, with their assets served by this app (works offline)."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
"""Swagger UI and ReDoc builds shipped by the fastapi-offline package, mounted at :data:`DOCS_ASSETS_URL`."""
DOCS_ASSETS_URL = "/static/docs"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def docs_csp(html: str, *, inline_styles: bool = False) -> str:
    """The policy of the docs pages: their script and stylesheet from this app, their inline bootstrap
    script by hash (no 'unsafe-inline' scripts), and API calls to this server. ``inline_styles``: ReDoc
    injects its styles at run time (styled-components), so its page allows inline styles, never scripts."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                      for body in re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL))
    styles = "'self' 'unsafe-inline'" if inline_styles else "'self'"
    return (f"default-src 'none'; script-src 'self' {hashes}; style-src {styles}; "
            "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
            "base-uri 'none'; frame-ancestors 'none'")


def _with_csp(page: HTMLResponse, *, inline_styles: bool = False) -> HTMLResponse:
    page.headers["content-security-policy"] = docs_csp(bytes(page.body).decode(), inline_styles=inline_styles)
    return page


@router.get("/docs")
async def docs_page(request: Request) -> HTMLResponse:
    """Swagger UI from the app's own files, so it renders offline."""
    return _with_csp(get_swagger_ui_html(
        openapi_url=request.app.openapi_url, title=f"{request.app.title} - docs",
        oauth2_redirect_url="/docs/oauth2-redirect", swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css", swagger_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png"))


@router.get("/redoc")
async def redoc_page(request: Request) -> HTMLResponse:
    """ReDoc from the app's own files (no web fonts), so it renders offline."""
    return _with_csp(get_redoc_html(
        openapi_url=request.app.openapi_url, title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{DOCS_ASSETS_URL}/redoc.standalone.js", redoc_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png",
        with_google_fonts=False), inline_styles=True)


@router.get("/docs/oauth2-redirect")
async def docs_oauth2_redirect() -> HTMLResponse:
    return _with_csp(get_swagger_ui_oauth2_redirect_html())
