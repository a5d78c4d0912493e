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


def _held_out_photos(train: str, val: str | None, val_split: str | None, image_dir: str | None) -> list[Path]:
    """The validation photos of the training data, or [] when they are not readable here."""
    from transresnet.data import load_dataset

    source, split = (val, None) if val else (train, val_split)
    if not split and not val:
        return []
    try:
        dataset = load_dataset(source, split=split, image_dir=image_dir)
    except (OSError, ValueError):  # moved, renamed or without that split: fall back to the image folder
        return []
    return [record.image_path for record in dataset.records]


@functools.lru_cache(maxsize=8)
def _sample_files(train: str, val: str | None, val_split: str | None, image_dir: str | None) -> dict[str, Path]:
    held_out = _spread(_held_out_photos(train, val, val_split, image_dir))
    if held_out:
        return held_out
    folder = Path(train).resolve().parent / "images"
    return _spread(list(folder.iterdir())) if folder.is_dir() else {}


def sample_files(bundle: Bundle) -> dict[str, Path]:
    data = bundle.checkpoint.config.data
    return _sample_files(data.train, data.val, data.val_split, data.image_dir) if data.train else {}


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
