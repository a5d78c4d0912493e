"""POST /v1/admin/reload: swap in the newest index version (and optionally a checkpoint) without downtime."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Depends

from ..deps import ResourcesDep, SettingsDep, require_admin
from ..errors import ReloadPathForbidden
from ..schemas import ErrorResponse, IndexInfo, ModelInfo, ReloadRequest, ReloadResponse
from ..settings import ServiceSettings

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses={401: {"model": ErrorResponse, "description": "Missing or wrong admin token"},
                              403: {"model": ErrorResponse,
                                    "description": "Admin endpoints disabled, or a checkpoint outside the "
                                                   "allowed reload roots"}})


def allowed_reload_path(raw: str, settings: ServiceSettings) -> Path:
    """The resolved path, if it lies under one of the reload roots; else 403 with one message for every
    refused path (existing or not, so the answer reveals nothing about the server's files)."""
    roots = settings.effective_reload_roots
    refused = ReloadPathForbidden("the checkpoint is not under an allowed reload root; put it under one of the "
                                  "directories in TRANSRESNET_RELOAD_ROOTS (by default the directory holding "
                                  "the served checkpoint, and the index root)")
    if any(not ch.isprintable() for ch in raw):
        raise refused
    try:
        resolved = Path(raw).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loops, NUL bytes
        raise refused from None
    if not any(resolved.is_relative_to(root) for root in roots):
        logger.warning("reload refused: checkpoint %r resolves to %r, outside the reload roots %r",
                       raw, str(resolved), [str(r) for r in roots])
        raise refused
    return resolved


@router.post("/reload", response_model=ReloadResponse, summary="Serve the newest index version",
             responses={409: {"model": ErrorResponse,
                              "description": "The new index or checkpoint is corrupt or does not match; "
                                             "the old one keeps serving"}})
async def reload(resources: ResourcesDep, settings: SettingsDep,
                 body: Annotated[ReloadRequest | None, Body()] = None) -> ReloadResponse:
    """Loads the index root's current version (checked against the checkpoint) and swaps it in; requests
    in flight finish on the old index. With `checkpoint` (a directory under the allowed reload roots), loads
    that checkpoint too."""
    start = time.perf_counter()
    checkpoint = allowed_reload_path(body.checkpoint, settings) if body and body.checkpoint else None
    logger.info("reload requested (checkpoint %r)", str(checkpoint) if checkpoint else None)
    old, new = await resources.reload(checkpoint)
    return ReloadResponse(model=ModelInfo(**new.model_info), index=IndexInfo(**new.index_info),
                          previous_model=ModelInfo(**old.model_info), previous_index=IndexInfo(**old.index_info),
                          seconds=round(time.perf_counter() - start, 3))
