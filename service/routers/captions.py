"""POST /v1/captions: a photo and one or more personalities -> ranked captions per personality."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request

from ..bundle import Bundle
from ..deps import ResourcesDep
from ..errors import InvalidRequest, UnknownPersonality
from ..parsing import parse_captions_request
from ..ranking import Ranking
from ..schemas import (
    CaptionHit,
    CaptionsJSONRequest,
    CaptionsResponse,
    ErrorResponse,
    IndexInfo,
    ModelInfo,
    PersonalityRanking,
    Timings,
)
from ..settings import MAX_K

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["captions"])

NONE_LABEL = "none"

# FastAPI cannot derive one operation that takes a form *or* JSON, so the request body is described here.
_FORM_SCHEMA = {
    "type": "object",
    "required": ["image", "personality"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "JPEG, PNG, WebP, GIF, BMP or TIFF"},
        "personality": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 200},
                        "minItems": 1, "description": "Repeat the field for several personalities"},
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 5},
    },
}
_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": _FORM_SCHEMA,
                                "encoding": {"personality": {"style": "form", "explode": True}}},
        "application/json": {"schema": CaptionsJSONRequest.model_json_schema()},  # flat: no $defs to resolve
    },
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "Image over the byte or pixel limit"},
    415: {"model": ErrorResponse, "description": "Neither multipart/form-data nor JSON"},
    422: {"model": ErrorResponse, "description": "Invalid image, unknown personality, k out of range, "
                                                 "missing field, malformed base64"},
    503: {"model": ErrorResponse, "description": "Model and index not loaded yet"},
}


def resolve_personalities(bundle: Bundle, names: Sequence[str], limit: int) -> list[int]:
    from transresnet.traits import UnknownTraitError

    if len(names) > limit:
        raise InvalidRequest(f"{len(names)} personalities asked for; at most {limit} per request",
                             problems=[{"field": "personality", "message": f"at most {limit}"}])
    slots: list[int] = []
    unknown: list[UnknownTraitError] = []
    for name in names:
        try:
            slots.append(bundle.traits.lookup(name))
        except UnknownTraitError as err:
            unknown.append(err)
    if unknown:
        suggestions = list(dict.fromkeys(s for err in unknown for s in err.suggestions))
        raise UnknownPersonality("; ".join(str(err) for err in unknown) + ". GET /v1/personalities lists them all",
                                 suggestions=suggestions,
                                 problems=[{"field": "personality", "message": str(err)} for err in unknown])
    return slots


def _trait_label(bundle: Bundle, slot: int) -> str:
    return NONE_LABEL if slot == 0 else bundle.traits.name_of(slot)


def build_response(bundle: Bundle, names: Sequence[str], slots: Sequence[int], k: int,
                   ranking: Ranking) -> CaptionsResponse:
    results = [
        PersonalityRanking(requested=name, personality=_trait_label(bundle, slot),
                           captions=[CaptionHit(id=str(h.id), caption=h.caption, score=float(h.score),
                                                metadata=dict(h.metadata or {})) for h in hits])
        for name, slot, hits in zip(names, slots, ranking.hits, strict=True)
    ]
    ms = {f"{stage}_ms": round(seconds * 1000.0, 3) for stage, seconds in ranking.timings_s.items()}
    return CaptionsResponse(
        results=results, k=k, model=ModelInfo(**bundle.model_info), index=IndexInfo(**bundle.index_info),
        timings=Timings(**ms, encode_batch_size=ranking.encode_batch, search_batch_size=ranking.search_batch))


@router.post(
    "/captions",
    response_model=CaptionsResponse,
    summary="Rank captions for a photo in one or more personalities",
    responses=_ERRORS,
    openapi_extra={"requestBody": _REQUEST_BODY},
)
async def rank_captions(request: Request, resources: ResourcesDep) -> CaptionsResponse:
    """Send a photo and personalities as multipart/form-data (`image`, `personality` repeated, `k`) or as
    JSON (`image_base64`, `personality`, `k`). The image is encoded once for all personalities."""
    settings = resources.settings
    query = await parse_captions_request(request, settings)
    bundle = resources.bundle  # held for the whole request: a reload never changes it under us
    slots = resolve_personalities(bundle, query.personalities, settings.max_personalities)
    k = min(query.k, len(bundle.index))
    ranking = await resources.ranker.rank(bundle, query.image, slots, k)
    resources.metrics.personalities.inc(len(slots))
    return build_response(bundle, query.personalities, slots, query.k, ranking)

