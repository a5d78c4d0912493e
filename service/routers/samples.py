"""GET /v1/samples: a few photos of the kind the served model was trained on, for a first try on the page.

The photos come from the image folder beside the checkpoint's training data (``images/`` beside
``data.train``), so the embedded demo offers its own drawings; a model whose training data is not on this
machine offers none. Only the listed files are served: a name is looked up, never joined onto a path.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

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
    samples: list[Sample] = Field(description="Up to 8 photos like the training photos; empty when the "
                                              "training data is not on this machine")


@functools.lru_cache(maxsize=8)
def _sample_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
    step = max(1, len(files) // MAX_SAMPLES)  # spread over the set, not the first few of one kind
    return {p.name: p for p in files[::step][:MAX_SAMPLES]}


def sample_files(bundle: Bundle) -> dict[str, Path]:
    train = bundle.checkpoint.config.data.train
    return _sample_files(Path(train).resolve().parent / "images") if train else {}


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
