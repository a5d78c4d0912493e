"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..schemas import GeneratorInfo, HealthResponse, IndexFallback, IndexInfo, ModelInfo, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="The process is up")
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get("/readyz", response_model=ReadyResponse, summary="Model and index are loaded",
            responses={503: {"model": ReadyResponse, "description": "Not ready yet"}})
async def readyz(request: Request) -> ReadyResponse | JSONResponse:
    resources = getattr(request.app.state, "resources", None)
    if resources is None or not resources.ready:
        return JSONResponse(ReadyResponse(ready=False).model_dump(), status_code=503)
    bundle = resources.bundle
    fallback = bundle.index_fallback
    generator = resources.generator
    return ReadyResponse(ready=True, model=ModelInfo(**bundle.model_info), index=IndexInfo(**bundle.index_info),
                         generator=GeneratorInfo(**generator.info) if generator is not None else None,
                         index_fallback=IndexFallback(**fallback) if fallback else None)
