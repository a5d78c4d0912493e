"""FastAPI dependencies: handlers get the loaded resources and settings through ``Depends``."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import AdminDisabled, NotReady, Unauthorized
from .resources import Resources
from .settings import ServiceSettings

_bearer = HTTPBearer(auto_error=False, description="The admin token (TRANSRESNET_ADMIN_TOKEN)")


def get_resources(request: Request) -> Resources:
    resources = getattr(request.app.state, "resources", None)
    if resources is None:
        raise NotReady("the service is starting; retry shortly")
    return resources


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
ResourcesDep = Annotated[Resources, Depends(get_resources)]


def _unauthorized() -> Unauthorized:
    return Unauthorized("missing or wrong admin token: send 'Authorization: Bearer <TRANSRESNET_ADMIN_TOKEN>'",
                        headers={"WWW-Authenticate": "Bearer"})


def require_admin(settings: SettingsDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Only ``Authorization: Bearer <token>`` with a configured, non-blank token passes (Basic and any other
    scheme are refused: ``HTTPBearer`` gives None for them)."""
    if not settings.admin_enabled or settings.admin_token is None:
        raise AdminDisabled("admin endpoints are disabled: start the server with TRANSRESNET_ADMIN_TOKEN set "
                            "to a non-blank secret")
    expected = settings.admin_token.get_secret_value().encode()
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized()
    if not secrets.compare_digest(credentials.credentials.encode(), expected):
        raise _unauthorized()
