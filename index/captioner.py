"""The Python API: rank captions for photos in one or more personalities, on the service's own path.

    from transresnet import Captioner

    captioner = Captioner.load("runs/flickr8k/best", "indexes/flickr8k")
    for ranking in captioner.rank("photo.jpg", ["Sweet", "Sarcastic"], k=5):
        print(ranking.personality, [c.caption for c in ranking.captions])

Photos may be file paths, bytes, PIL images or ``uint8`` arrays (H, W, 3); a list of photos gives one
list of rankings per photo. Decoding (:mod:`transresnet.images`), query encoding
(:func:`transresnet.encode.encode_photo_queries`) and search (:meth:`CaptionIndex.search`) are the ones
the HTTP service runs, so a photo ranks the same here as over HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from transresnet.checkpoint import Checkpoint, load_checkpoint
from transresnet.devices import resolve_device
from transresnet.encode import encode_photo_queries
from transresnet.images import ImagePreprocessor, load_rgb, to_rgb
from transresnet.options import Device

from .search import CaptionIndex, load_index

Photo = str | Path | bytes | Image.Image | np.ndarray
NONE_LABEL = "none"


@dataclass(frozen=True)
class RankedCaption:
    caption: str
    score: float
    """The model's score (inner product of query and caption vectors); higher is better."""
    id: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ranking:
    """The top-k captions of one photo in one personality."""

    requested: str
    personality: str
    """The trait as the model names it (synonyms resolved), or "none"."""
    captions: list[RankedCaption]


def _to_image(photo: Photo) -> Image.Image:
    if isinstance(photo, Image.Image):
        return to_rgb(photo)
    if isinstance(photo, np.ndarray):
        if photo.dtype != np.uint8 or photo.ndim not in (2, 3):
            raise ValueError(f"an image array must be uint8 (H, W) or (H, W, 3|4), got {photo.dtype} "
                             f"{photo.shape}")
        return to_rgb(Image.fromarray(photo))
    if isinstance(photo, (str, Path, bytes)):
        return load_rgb(photo)
    raise TypeError(f"cannot read a photo from {type(photo).__name__}: pass a path, bytes, a PIL image or "
                    "a uint8 array")


class Captioner:
    """A checkpoint and the caption index built for it (checked against its text fingerprint)."""

    def __init__(self, checkpoint: Checkpoint, index: CaptionIndex) -> None:
        self.checkpoint = checkpoint
        self.index = index
        self.preprocessor = ImagePreprocessor(checkpoint.config.model.image)

    @classmethod
    def load(cls, checkpoint: str | Path, index: str | Path, *, device: Device = "auto") -> Captioner:
        loaded = load_checkpoint(checkpoint, device=resolve_device(device))
        return cls(loaded, load_index(index, checkpoint=loaded))

    @property
    def personalities(self) -> list[str]:
        return list(self.checkpoint.traits.names)

    def rank(self, photos: Photo | Sequence[Photo], personalities: str | Sequence[str] = NONE_LABEL,
             k: int = 5) -> list[Ranking] | list[list[Ranking]]:
        """Top-k captions per personality: a list of rankings, or one such list per photo for a list."""
        single = not isinstance(photos, (list, tuple))
        batch = [photos] if single else list(photos)
        names = [personalities] if isinstance(personalities, str) else list(personalities)
        if not names:
            raise ValueError("name at least one personality (or 'none')")
        slots = self.checkpoint.traits.lookup_many(names)  # unknown traits: an error naming the closest
        if not batch:
            return []
        pixels = torch.stack([self.preprocessor(_to_image(photo)) for photo in batch])
        queries = encode_photo_queries(self.checkpoint.model, pixels, [slots] * len(batch))
        hits = self.index.search(np.concatenate(queries), min(k, len(self.index)))
        rankings = [self._rankings(names, slots, hits[i * len(names):(i + 1) * len(names)])
                    for i in range(len(batch))]
        return rankings[0] if single else rankings

    def _rankings(self, names: list[str], slots: list[int], hits: list[list[Any]]) -> list[Ranking]:
        traits = self.checkpoint.traits
        return [Ranking(name, NONE_LABEL if slot == 0 else traits.name_of(slot),
                        [RankedCaption(h.caption, h.score, str(h.id), dict(h.metadata)) for h in found])
                for name, slot, found in zip(names, slots, hits, strict=True)]
