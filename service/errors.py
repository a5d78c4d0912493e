"""Errors the service answers with a JSON body ``{"error": code, "message": what to fix, ...}``."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


class InvalidImage(ServiceError):
    status_code = 422
    code = "invalid_image"


class ImageTooLarge(ServiceError):
    status_code = 413
    code = "image_too_large"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class UnknownPersonality(ServiceError):
    status_code = 422
    code = "unknown_personality"


class InvalidRequest(ServiceError):
    status_code = 422
    code = "invalid_request"


class GeneratorUnavailable(InvalidRequest):
    code = "generator_unavailable"


class NotReady(ServiceError):
    status_code = 503
    code = "not_ready"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class AdminDisabled(ServiceError):
    status_code = 403
    code = "admin_disabled"


class ReloadPathForbidden(ServiceError):
    status_code = 403
    code = "reload_path_forbidden"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Overloaded(ServiceError):
    status_code = 503
    code = "overloaded"


class StageTimeout(ServiceError):
    status_code = 503
    code = "stage_timeout"


class RequestTimeout(ServiceError):
    status_code = 408
    code = "request_timeout"


class ClientDisconnected(ServiceError):
    status_code = 499  # nginx's "client closed request": counted in the metrics, read by nobody
    code = "client_disconnected"


class ReloadFailed(ServiceError):
    status_code = 409
    code = "reload_failed"


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def validation_error(errors: list[dict[str, Any]]) -> InvalidRequest:
    """Pydantic/FastAPI validation errors -> one 422 naming each field and what to fix."""
    problems = [{"field": _field_name(tuple(e.get("loc", ()))), "message": str(e.get("msg", "invalid"))}
                for e in errors]
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
    return InvalidRequest(f"invalid request: {summary}", problems=problems)
