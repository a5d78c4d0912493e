"""Image decoding and the preprocessing every path (training, feature cache, service) shares."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from transresnet.config import ImageEncoderConfig


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode an image file or bytes into RGB pixels (alpha and palettes flattened)."""
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(handle) as img:
        img.load()
        return img.convert("RGB")


class ImagePreprocessor:
    """Resize the short side, centre-crop, scale to [0, 1] and normalise, as the backbone expects."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        self.cfg = cfg
        self.eval_transform = T.Compose([
            T.PILToTensor(),
            T.Resize(cfg.effective_resize, antialias=True),
            T.CenterCrop(cfg.image_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(cfg.mean), list(cfg.std)),
        ])
        self.train_transform = T.Compose([
            T.PILToTensor(),
            T.RandomResizedCrop(cfg.image_size, scale=(0.6, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(cfg.mean), list(cfg.std)),
        ])

    def __call__(self, image: Image.Image, *, augment: bool = False) -> torch.Tensor:
        return (self.train_transform if augment else self.eval_transform)(image)

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self(img) for img in images])

    def identity(self) -> str:
        """A key that changes whenever the pixels reaching the backbone would."""
        fields = {k: self.cfg.model_dump(mode="json")[k] for k in ("image_size", "mean", "std")}
        fields["resize"] = self.cfg.effective_resize
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
