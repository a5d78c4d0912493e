"""Reading a caption request: multipart form or JSON, with the body size capped while it streams in."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.types import Message, Receive

from .errors import ImageTooLarge, InvalidRequest, PayloadTooLarge, UnsupportedMediaType, validation_error
from .imaging import decode_base64
from .ranking import Upload
from .schemas import CaptionsJSONRequest, CaptionsQuery, Mode
from .settings import ServiceSettings

logger = logging.getLogger(__name__)

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_ENVELOPE = 64 * 1024  # room for form fields, multipart boundaries and JSON keys around the image
_HOW = ("send multipart/form-data with a file field 'image' and fields 'personality' (repeatable), 'k' and "
        "optionally 'mode', 'beam_size', 'max_length', 'consensus', or application/json with image_base64, "
        "personality, k and the same options")


@dataclass(frozen=True)
class CaptionsInput:
    image: Upload
    """The image file's bytes, taken by the pipeline (and then released) exactly once."""
    personalities: list[str]
    k: int
    mode: Mode = "retrieve"
    beam_size: int | None = None
    max_length: int | None = None
    consensus: bool = False


def body_limit(settings: ServiceSettings) -> int:
    """Largest request body: the image as base64 (4/3 of its bytes) plus the envelope."""
    return -(-settings.max_upload_bytes * 4 // 3) + _ENVELOPE


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body exceeds {limit:,} bytes; images may be at most "
                           f"{limit * 3 // 4 - _ENVELOPE:,} bytes: send a smaller photo")


def _limited(request: Request, limit: int) -> Request:
    """The same request, whose body stream raises ``PayloadTooLarge`` once more than ``limit`` bytes arrive."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    received = 0
    receive: Receive = request.receive

    async def counting_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit)
        return message

    return Request(request.scope, counting_receive)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def parse_captions_request(request: Request, settings: ServiceSettings) -> CaptionsInput:
    media = _media_type(request)
    if media in FORM_TYPES:
        return await _from_form(_limited(request, body_limit(settings)), settings)
    if media == "application/json" or media.endswith("+json"):
        return await _from_json(_limited(request, body_limit(settings)), settings)
    shown = media or "none"
    raise UnsupportedMediaType(f"content type {shown!r} is not accepted: {_HOW}")


def _validate(fields: dict[str, Any]) -> CaptionsQuery:
    try:
        return CaptionsQuery.model_validate(fields)
    except ValidationError as err:
        raise validation_error(err.errors()) from None


def _missing(field: str, how: str) -> InvalidRequest:
    return InvalidRequest(f"missing field {field!r}: {how}", problems=[{"field": field, "message": how}])


async def _read_upload(images: list[Any], settings: ServiceSettings) -> bytes:
    if not images:
        raise _missing("image", "attach the photo as a file field named 'image'")
    if len(images) > 1:
        raise InvalidRequest(f"{len(images)} 'image' parts sent; send exactly one photo per request",
                             problems=[{"field": "image", "message": "exactly one file expected"}])
    image = images[0]
    if not isinstance(image, UploadFile):
        raise InvalidRequest("'image' must be a file upload (multipart/form-data with a filename), not a text "
                             "field; to send base64 use a JSON body with image_base64",
                             problems=[{"field": "image", "message": "expected a file"}])
    if image.size is not None and image.size > settings.max_upload_bytes:
        raise ImageTooLarge(f"the image is {image.size:,} bytes; the limit is {settings.max_upload_bytes:,} "
                            "bytes: send a smaller or more compressed photo")
    data = await image.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ImageTooLarge(f"the image is over the limit of {settings.max_upload_bytes:,} bytes: "
                            "send a smaller or more compressed photo")
    return data


def _form_fields(form: FormData) -> dict[str, Any]:
    personalities = form.getlist("personality")
    fields: dict[str, Any] = {"personality": personalities or None}  # none: the router decides (model's traits)
    for name in ("k", "mode", "beam_size", "max_length", "consensus"):
        if name in form:
            fields[name] = form[name]
    return fields


async def _from_form(request: Request, settings: ServiceSettings) -> CaptionsInput:
    # Starlette streams the body through its multipart parser chunk by chunk: a file part is spooled (up to
    # 1 MiB in memory, then a temporary file), every other part is capped at 64 KiB; too many parts or files
    # is a 400. Two files are let through so that two 'image' parts get a clear 422.
    form = await request.form(max_files=2, max_fields=settings.max_personalities + 8, max_part_size=64 * 1024)
    try:
        query = _validate(_form_fields(form))
        image = await _read_upload(form.getlist("image"), settings)
    finally:
        await form.close()
    return CaptionsInput(Upload(image), query.personality or [], query.k, query.mode, query.beam_size,
                         query.max_length, query.consensus)


async def _from_json(request: Request, settings: ServiceSettings) -> CaptionsInput:
    body = await request.body()
    try:
        payload = CaptionsJSONRequest.model_validate_json(body)
    except ValidationError as err:
        raise validation_error(err.errors()) from None
    del body
    image = decode_base64(payload.image_base64, settings.max_upload_bytes)
    return CaptionsInput(Upload(image), payload.personality or [], payload.k, payload.mode, payload.beam_size,
                         payload.max_length, payload.consensus)
