"""GET /: the single-page demo (plain HTML/JS from service/static, no build step); GET /docs: Swagger UI."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
SWAGGER_CDN = "https://cdn.jsdelivr.net"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def docs_csp(html: str) -> str:
    """The policy of the docs page: Swagger UI's script and stylesheet from its CDN, its inline bootstrap
    script by hash (no 'unsafe-inline'), the favicon, and API calls to this server only."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                      for body in re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL))
    return (f"default-src 'none'; script-src {SWAGGER_CDN} {hashes}; style-src {SWAGGER_CDN}; "
            "img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self'; base-uri 'none'; "
            "frame-ancestors 'none'")


def _with_csp(page: HTMLResponse) -> HTMLResponse:
    page.headers["content-security-policy"] = docs_csp(bytes(page.body).decode())
    return page


@router.get("/docs")
async def docs_page(request: Request) -> HTMLResponse:
    """Swagger UI. It loads its script and stylesheet from cdn.jsdelivr.net (the browser fetches them; the
    server never does), so this one page allows that host; every other page allows only the app's own files."""
    return _with_csp(get_swagger_ui_html(openapi_url=request.app.openapi_url, title=f"{request.app.title} - docs",
                                         oauth2_redirect_url="/docs/oauth2-redirect"))


@router.get("/docs/oauth2-redirect")
async def docs_oauth2_redirect() -> HTMLResponse:
    return _with_csp(get_swagger_ui_oauth2_redirect_html())
