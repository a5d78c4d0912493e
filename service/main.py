"""The FastAPI application: ``create_app(settings)`` builds it; the lifespan loads model and index once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ServiceError, validation_error
from .follow import index_follower
from .metrics import ServiceMetrics
from .resources import Resources
from .routers import admin, captions, health, metrics, personalities, samples, web
from .security import HeaderLimitMiddleware, SecurityHeadersMiddleware
from .settings import ServiceSettings

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"
DESCRIPTION = """Here is a photo and a personality: what would this personality say?

Ranks a fixed set of candidate captions for an image, in the voice of one or more personality traits
(TransResNet, Shuster et al., CVPR 2019). Try it at [/](/)."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ServiceSettings = app.state.settings
    resources = Resources(settings, app.state.metrics)
    follower = index_follower(settings, resources)  # a follow setting that cannot work fails before any load
    await resources.start()
    app.state.resources = resources
    logger.info("serving model %s with index %s (%d captions)", resources.bundle.model_info["version"],
                resources.bundle.index.version, len(resources.bundle.index))
    _log_admin_state(settings)
    if follower is not None:
        follower.start()
    try:
        yield
    finally:
        if follower is not None:
            await follower.stop()
        app.state.resources = None
        await resources.close()


def _log_admin_state(settings: ServiceSettings) -> None:
    if settings.admin_enabled:
        logger.info("admin endpoints enabled; reloads may name checkpoints under %r",
                    [str(root) for root in settings.effective_reload_roots])
    else:
        logger.info("admin endpoints disabled: TRANSRESNET_ADMIN_TOKEN is unset, empty or blank")


def route_template(scope: Scope) -> str:
    """The route's path template (``/v1/captions``, ``/static/{path}``), never the raw path, so label values
    stay few; "unmatched" only for paths no route or mount serves (404s)."""
    route = scope.get("route")
    if getattr(route, "path", None):
        return route.path
    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = candidate.matches({**scope, "path": scope.get("path", ""), "root_path": ""})
        if match == Match.FULL:
            return candidate.path + ("/{path}" if isinstance(candidate, Mount) else "")
    return "unmatched"


class MetricsMiddleware:
    """Counts requests by route template and status (pure ASGI: no per-request task or body copy)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(scope["method"], route_template(scope), str(status)).inc()


def _error_response(request: Request, err: ServiceError) -> JSONResponse:
    request.app.state.metrics.errors.labels(err.code).inc()
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)


async def service_error_handler(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, ServiceError)
    return _error_response(request, err)


async def validation_error_handler(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestValidationError)
    return _error_response(request, validation_error(list(err.errors())))


async def http_error_handler(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, StarletteHTTPException)
    code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    error = ServiceError(str(err.detail), headers=dict(err.headers or {}) or None)
    error.status_code, error.code = err.status_code, code
    return _error_response(request, error)


async def unexpected_error_handler(request: Request, err: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %r", request.method, request.url.path)
    error = ServiceError("internal error; the server logged the details")
    error.status_code, error.code = 500, "internal"
    return _error_response(request, error)


def _document_limits(app: FastAPI, settings: ServiceSettings) -> None:
    """The OpenAPI schema states this server's limits (built once, on the first GET /openapi.json)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = captions.document_limits(build(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Build the app; nothing is loaded until the lifespan starts (``uvicorn`` or ``TestClient`` as context)."""
    settings = settings or ServiceSettings()
    app = FastAPI(title="TransResNet personality captions", version=API_VERSION, description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None)  # /docs: routers/web.py, with its own CSP
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    app.state.resources = None
    for router in (captions.router, personalities.router, samples.router, health.router, admin.router,
                   metrics.router, web.router):
        app.include_router(router)
    app.mount(web.DOCS_ASSETS_URL, StaticFiles(directory=web.DOCS_ASSETS_DIR), name="docs-assets")
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    app.add_exception_handler(ServiceError, service_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    _document_limits(app, settings)
    app.add_middleware(HeaderLimitMiddleware, max_headers=settings.max_headers,
                       max_header_bytes=settings.max_header_bytes)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
