"""POST /v1/captions: a photo and one or more personalities -> ranked captions per personality."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from ..bundle import Bundle
from ..deps import ResourcesDep
from ..errors import ClientDisconnected, GeneratorUnavailable, InvalidRequest, RequestTimeout, UnknownPersonality
from ..generating import Candidate, Generator
from ..imaging import supported_formats
from ..parsing import CaptionsInput, parse_captions_request
from ..ranking import Captioning, CaptionPlan
from ..schemas import (
    CONSENSUS_DESCRIPTION,
    MODE_DESCRIPTION,
    CaptionHit,
    CaptionsJSONRequest,
    CaptionsResponse,
    ErrorResponse,
    GeneratorInfo,
    IndexInfo,
    ModelInfo,
    PersonalityRanking,
    Timings,
)
from ..settings import MAX_K, ServiceSettings

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["captions"])

NONE_LABEL = "none"
Item = TypeVar("Item")

_FORMATS = supported_formats()
_FORMATS_TEXT = ", ".join(_FORMATS)

# FastAPI cannot derive one operation that takes a form *or* JSON, so the request body is described here.
_FORM_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "string", "format": "binary",
                  "description": f"Exactly one photo: {_FORMATS_TEXT} (formats this server's Pillow reads)"},
        "personality": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 200},
                        "minItems": 1, "maxItems": ServiceSettings.model_fields["max_personalities"].default,
                        "description": "Repeat the field for several personalities; required when the model "
                                       "has personalities (a model without any ranks for the photo alone)"},
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 5},
        "mode": {"type": "string", "enum": ["retrieve", "generate", "hybrid"], "default": "retrieve",
                 "description": MODE_DESCRIPTION},
        "beam_size": {"type": "integer", "minimum": 1, "maximum": 64,
                      "description": "Beam width for generate and hybrid (at most the server's max_beam_size)"},
        "max_length": {"type": "integer", "minimum": 1, "maximum": 100,
                       "description": "Most words per generated caption (at most the server's "
                                      "max_generate_length)"},
        "consensus": {"type": "boolean", "default": False, "description": CONSENSUS_DESCRIPTION},
    },
}


_JSON_SCHEMA = CaptionsJSONRequest.model_json_schema()  # flat: no $defs to resolve
_JSON_SCHEMA["properties"]["personality"]["maxItems"] = ServiceSettings.model_fields["max_personalities"].default
_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": _FORM_SCHEMA, "encoding": {"personality": {"style": "form",
                                                                                     "explode": True}}},
        "application/json": {"schema": _JSON_SCHEMA},
    },
}


def document_limits(schema: dict[str, Any], settings: ServiceSettings) -> dict[str, Any]:
    """The OpenAPI schema with this server's own ``max_personalities`` as ``maxItems``."""
    for media in schema["paths"]["/v1/captions"]["post"]["requestBody"]["content"].values():
        media["schema"]["properties"]["personality"]["maxItems"] = settings.max_personalities
    return schema


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed multipart body, or too many fields or files"},
    408: {"model": ErrorResponse, "description": "The request body did not arrive within the read timeout"},
    413: {"model": ErrorResponse, "description": "Body, image bytes or image pixels over the limit"},
    415: {"model": ErrorResponse, "description": "Neither multipart/form-data nor JSON"},
    422: {"model": ErrorResponse, "description": "Invalid image (accepted: " + _FORMATS_TEXT + "), two image "
                                                 "parts, unknown personality, too many personalities, k out of "
                                                 "range, missing field, malformed base64, beam size or length "
                                                 "over the server's limits, or mode generate / hybrid on a "
                                                 "server without a generator (error generator_unavailable)"},
    431: {"model": ErrorResponse, "description": "Request headers too large or too many (the size limit is "
                                                 "answered by the server in plain text)"},
    503: {"model": ErrorResponse, "description": "Model and index not loaded yet, too many requests in flight, "
                                                 "or a stage timed out; retry after the Retry-After seconds",
          "headers": {"Retry-After": {"description": "Seconds to wait before retrying",
                                      "schema": {"type": "integer"}}}},
}


NO_TRAITS_MESSAGE = "this model has no personalities: captions are ranked for the photo alone"


def requested_personalities(bundle: Bundle, names: Sequence[str]) -> list[str]:
    """The names asked for; with none given, 'none' for a model without personalities, else an error."""
    if names:
        return list(names)
    if len(bundle.traits) <= 1:  # slot 0 ("no personality") only
        return [NONE_LABEL]
    how = "name one or more traits (GET /v1/personalities lists them), or 'none'"
    raise InvalidRequest(f"missing field 'personality': {how}", problems=[{"field": "personality", "message": how}])


def resolve_personalities(bundle: Bundle, names: Sequence[str], limit: int) -> list[int]:
    if len(names) > limit:
        raise InvalidRequest(f"{len(names)} personalities asked for; at most {limit} per request",
                             problems=[{"field": "personality", "message": f"at most {limit}"}])
    return _slots(bundle.traits.lookup, names, "")


def _slots(lookup: Callable[[str], int], names: Sequence[str], whose: str) -> list[int]:
    """Each name's slot; every unknown name is reported in one 422, with the closest known traits."""
    from transresnet.traits import UnknownTraitError

    slots: list[int] = []
    unknown: list[UnknownTraitError] = []
    for name in names:
        try:
            slots.append(lookup(name))
        except UnknownTraitError as err:
            unknown.append(err)
    if unknown:
        suggestions = list(dict.fromkeys(s for err in unknown for s in err.suggestions))
        raise UnknownPersonality(whose + "; ".join(str(err) for err in unknown) +
                                 ". GET /v1/personalities lists them all",
                                 suggestions=suggestions,
                                 problems=[{"field": "personality", "message": str(err)} for err in unknown])
    return slots


def _trait_label(bundle: Bundle, slot: int) -> str:
    return NONE_LABEL if slot == 0 else bundle.traits.name_of(slot)


def _finite(hits: Sequence[Any], bundle: Bundle) -> list[Any]:
    """Hits with a finite score. A NaN or infinite score means a damaged index or model (the index refuses
    non-finite vectors at build and load); it has no rank, so it is dropped and logged, never sent as null."""
    kept = [h for h in hits if math.isfinite(float(h.score))]
    if len(kept) < len(hits):
        logger.error("dropped %d non-finite scores from index %r: rebuild the index with `transresnet index "
                     "build`", len(hits) - len(kept), str(bundle.index.version))
    return kept


def generator_slots(generator: Generator, names: Sequence[str]) -> list[int]:
    """The generator's slots for the personalities (all 0 when it has no personality input: the names were
    checked against the retrieval model's traits already)."""
    if not generator.uses_traits:
        return [0] * len(names)
    return _slots(generator.traits.lookup, names, "the caption generator does not know ")


def _check_limit(value: int | None, limit: int, field: str, setting: str) -> None:
    if value is not None and value > limit:
        message = f"{field} {value} is over this server's limit of {limit} (TRANSRESNET_{setting.upper()})"
        raise InvalidRequest(message, problems=[{"field": field, "message": f"at most {limit}"}])


def plan_request(resources: Any, query: CaptionsInput) -> tuple[list[str], CaptionPlan]:
    """The personalities as asked and what the pipeline must do for them; bad requests raise their 4xx."""
    settings = resources.settings
    bundle = resources.bundle  # held for the whole request: a reload never changes it under us
    names = requested_personalities(bundle, query.personalities)
    slots = tuple(resolve_personalities(bundle, names, settings.max_personalities))
    k = min(query.k, len(bundle.index))
    if query.mode == "retrieve":
        if query.consensus:
            how = "consensus re-ranks generated captions: use mode 'generate' or 'hybrid', or leave consensus out"
            raise InvalidRequest(f"consensus with mode 'retrieve': {how}",
                                 problems=[{"field": "consensus", "message": how}])
        return names, CaptionPlan("retrieve", bundle, slots, k)
    generator = resources.generator
    if generator is None:
        how = ("this server has no caption generator: use mode 'retrieve', or start it with --generator RUN/best "
               "(TRANSRESNET_GENERATOR)")
        raise GeneratorUnavailable(f"mode {query.mode!r} needs a caption generator; {how}",
                                   problems=[{"field": "mode", "message": how}])
    _check_limit(query.beam_size, settings.max_beam_size, "beam_size", "max_beam_size")
    if query.consensus and not settings.consensus_k:
        how = "this server has consensus re-ranking off (TRANSRESNET_CONSENSUS_K=0): leave consensus out"
        raise InvalidRequest(how, problems=[{"field": "consensus", "message": how}])
    consensus_k = min(settings.consensus_k, len(bundle.index)) if query.consensus else None
    _check_limit(query.max_length, settings.max_generate_length, "max_length", "max_generate_length")
    decoding = generator.decoding(query.beam_size or min(generator.default_decoding.beam_size, settings.max_beam_size),
                                  query.max_length or min(generator.default_decoding.max_length,
                                                          settings.max_generate_length))
    plan = CaptionPlan(query.mode, bundle, slots, query.k, generator, tuple(generator_slots(generator, names)),
                       decoding, consensus_k)
    return names, plan


def _hit(candidate: Candidate) -> CaptionHit:
    return CaptionHit(id=candidate.id, caption=candidate.caption, score=candidate.score, source=candidate.source,
                      generation_score=candidate.generation_score, metadata=candidate.metadata)


def build_response(plan: CaptionPlan, names: Sequence[str], k: int, captioning: Captioning) -> CaptionsResponse:
    bundle = plan.bundle
    results = [PersonalityRanking(requested=name, personality=_trait_label(bundle, slot),
                                  captions=[_hit(c) for c in _finite(candidates, bundle)])
               for name, slot, candidates in zip(names, plan.trait_ids, captioning.candidates, strict=True)]
    ms = {f"{stage}_ms": round(seconds * 1000.0, 3) for stage, seconds in captioning.timings_s.items()}
    sizes = {f"{stage}_batch_size": size for stage, size in captioning.batch_sizes.items() if stage != "rescore"}
    generator = GeneratorInfo(**plan.generator.info) if plan.generator is not None else None
    return CaptionsResponse(
        results=results, k=k, mode=plan.mode, model=ModelInfo(**bundle.model_info),  # type: ignore[arg-type]
        index=IndexInfo(**bundle.index_info), generator=generator, consensus_k=plan.consensus_k,
        timings=Timings(**ms, **sizes, decode_steps=captioning.decode_steps))


@router.post(
    "/captions",
    response_model=CaptionsResponse,
    response_model_exclude_none=True,  # the stages and fields a mode does not use are left out, not null
    summary="Captions for a photo in one or more personalities: ranked, generated or both",
    responses=_ERRORS,
    openapi_extra={"requestBody": _REQUEST_BODY},
    description="Send a photo and personalities as multipart/form-data (`image`, `personality` repeated, `k`) "
                "or as JSON (`image_base64`, `personality`, `k`). The image is encoded once for all "
                f"personalities. Accepted image formats: {_FORMATS_TEXT}. `mode`: {MODE_DESCRIPTION}; "
                "`beam_size` and `max_length` tune the beam search; `consensus` re-ranks by agreement with the "
                "photo's nearest index captions. Beyond the server's limit of "
                "requests in flight the answer is 503 with Retry-After, at once.",
)
async def rank_captions(request: Request, resources: ResourcesDep) -> CaptionsResponse:
    settings = resources.settings
    if resources.ranker.admission.full:
        drained = await drain_small_body(request, settings.read_timeout_s)
        raise resources.ranker.admission.refusal(close=not drained)
    with resources.ranker.admission.slot():  # 503 at once when full: before a byte of the body is read
        query = await _read_request(request, settings)
        names, plan = plan_request(resources, query)
        captioning = await until_disconnected(request, resources.ranker.caption(plan, query.image))
    resources.metrics.personalities.inc(len(names))
    return build_response(plan, names, query.k, captioning)


DRAIN_BYTES = 1 << 20
"""Bodies up to this size are read and dropped before a 503, so the connection closes cleanly: closing a
socket with unread request bytes makes the kernel send a reset, which the client sees as a failed request
instead of the 503. Larger bodies are refused at once with Connection: close."""


async def drain_small_body(request: Request, timeout_s: float) -> bool:
    """Read and drop a declared-small body (at most DRAIN_BYTES, within the body read timeout a normal
    request gets); True when it was read to the end."""
    length = request.headers.get("content-length", "")
    if not length.isdigit() or int(length) > DRAIN_BYTES:
        return False
    try:
        async with asyncio.timeout(timeout_s):
            async for _ in request.stream():
                pass
    except (TimeoutError, ClientDisconnect):
        return False
    return True


async def _read_request(request: Request, settings: ServiceSettings) -> CaptionsInput:
    try:
        async with asyncio.timeout(settings.read_timeout_s):
            return await parse_captions_request(request, settings)
    except ClientDisconnect:
        raise ClientDisconnected("the client closed the connection while sending the request") from None
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {settings.read_timeout_s:g}s; send it "
                             "faster or smaller", headers={"Connection": "close"}) from None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Coroutine[Any, Any, Item]) -> Item:
    """Run ``work`` while watching the connection; if the client goes away first, ``work`` is cancelled (it
    leaves whichever stage or queue it is in) and ``ClientDisconnected`` is raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnected("the client closed the connection before the answer was ready")
    return task.result()
