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


def require_admin(settings: SettingsDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    if settings.admin_token is None:
        raise AdminDisabled("admin endpoints are disabled: start the server with TRANSRESNET_ADMIN_TOKEN set")
    expected = settings.admin_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not secrets.compare_digest(given, expected):
        raise Unauthorized("missing or wrong admin token: send 'Authorization: Bearer <TRANSRESNET_ADMIN_TOKEN>'",
                           headers={"WWW-Authenticate": "Bearer"})
