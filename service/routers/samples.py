"""GET /v1/samples: a few photos of the kind the served model was trained on, for a first try on the page.

The photos are the held-out ones of the checkpoint's training data where that is on this machine (its
``data.val`` file, else the val split of ``data.train``): photos like the training photos that the model has
not seen, e.g. Flickr8k val photos for the real-photo demo. Without readable validation data they come from
the image folder beside ``data.train`` (``images/``); a model whose training data is not on this machine
offers none. Only the listed files are served: a name is looked up, never joined onto a path.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from transresnet.config import DataConfig
from transresnet.image_runtime import held_out_photos

from ..bundle import Bundle
from ..deps import ResourcesDep
from ..errors import NotFound

router = APIRouter(prefix="/v1", tags=["captions"])

MAX_SAMPLES = 8
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class Sample(BaseModel):
    name: str
    url: str = Field(description="GET it for the photo")


class SamplesResponse(BaseModel):
    samples: list[Sample] = Field(description="Up to 8 photos like the training photos (held-out "
                                              "validation photos where there are some); empty when the "
                                              "training data is not on this machine")


def _spread(files: list[Path]) -> dict[str, Path]:
    files = sorted({p.name: p for p in files if p.suffix.lower() in SUFFIXES and p.is_file()}.values())
    step = max(1, len(files) // MAX_SAMPLES)  # spread over the set, not the first few of one kind
    return {p.name: p for p in files[::step][:MAX_SAMPLES]}


@functools.lru_cache(maxsize=8)
def _sample_files(data_json: str) -> dict[str, Path]:
    # The same held-out photos image-precision calibration uses (keyed by the data section's JSON: hashable).
    return _spread(held_out_photos(DataConfig.model_validate_json(data_json)))


def sample_files(bundle: Bundle) -> dict[str, Path]:
    data = bundle.checkpoint.config.data
    return _sample_files(data.model_dump_json()) if data.train else {}


@router.get("/samples", response_model=SamplesResponse, summary="A few photos like the model's training photos")
async def list_samples(resources: ResourcesDep) -> SamplesResponse:
    files = sample_files(resources.bundle)
    return SamplesResponse(samples=[Sample(name=name, url=f"/v1/samples/{name}") for name in files])


@router.get("/samples/{name}", response_class=FileResponse, summary="One sample photo",
            responses={404: {"description": "No sample of that name"}})
async def get_sample(name: str, resources: ResourcesDep) -> FileResponse:
    path = sample_files(resources.bundle).get(name)
    if path is None:
        raise NotFound(f"no sample photo named {name!r}; GET /v1/samples lists them")
    return FileResponse(path)
