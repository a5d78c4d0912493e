"""POST /v1/admin/reload: swap in the newest index version (and optionally a checkpoint) without downtime."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Depends

from ..deps import ResourcesDep, require_admin
from ..schemas import ErrorResponse, IndexInfo, ModelInfo, ReloadRequest, ReloadResponse

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses={401: {"model": ErrorResponse, "description": "Missing or wrong admin token"},
                              403: {"model": ErrorResponse, "description": "Admin endpoints disabled"}})


@router.post("/reload", response_model=ReloadResponse, summary="Serve the newest index version",
             responses={409: {"model": ErrorResponse,
                              "description": "The new index or checkpoint is corrupt or does not match; "
                                             "the old one keeps serving"}})
async def reload(resources: ResourcesDep,
                 body: Annotated[ReloadRequest | None, Body()] = None) -> ReloadResponse:
    """Loads the index root's current version (checked against the checkpoint) and swaps it in; requests
    in flight finish on the old index. With `checkpoint`, loads that checkpoint too."""
    start = time.perf_counter()
    checkpoint = Path(body.checkpoint) if body and body.checkpoint else None
    old, new = await resources.reload(checkpoint)
    return ReloadResponse(model=ModelInfo(**new.model_info), index=IndexInfo(**new.index_info),
                          previous_model=ModelInfo(**old.model_info), previous_index=IndexInfo(**old.index_info),
                          seconds=round(time.perf_counter() - start, 3))
