"""The one image path: bytes or a file -> RGB pixels -> the tensor the backbone expects.

Training, the feature cache, evaluation, ``transresnet index query`` and the service all decode through
:func:`load_rgb` (the service first checks its untrusted-input limits on the lazily opened image, then
calls :func:`to_rgb`), so a photo gives the same pixels on every path:

- EXIF orientation is applied (phone photos store their rotation there);
- transparency (RGBA, LA, palette with a transparent colour) is composited onto :data:`BACKGROUND`;
- CMYK, greyscale, palette and 16-bit images are converted to 8-bit RGB (16-bit scaled, not clipped);
- animated images (GIF, WebP, APNG) give their first frame;
- large JPEGs are decoded by libjpeg at a reduced scale (``draft``), never below twice the short side the
  preprocessing resizes to, which keeps quality and costs a fraction of a full decode;
- large images of every format are then reduced by an integer factor (PIL ``reduce``, a box filter) right
  after loading, again never below twice that short side, so a huge PNG is not carried at full size through
  the conversions and the resize.

:data:`DECODE_VERSION` is part of the feature-cache key: changing any rule above must bump it.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T

from transresnet.config import ImageEncoderConfig

DECODE_VERSION = 3
BACKGROUND = (255, 255, 255)
"""Transparent pixels are shown on white, as a browser shows a transparent photo on a plain page."""

ImageSource = str | Path | bytes


def open_image(source: ImageSource, *, formats: tuple[str, ...] | None = None) -> Image.Image:
    """Open lazily: only the header is read, so size checks can run before any pixel is decoded."""
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    return Image.open(handle, formats=formats)


def _sixteen_bit_to_8(img: Image.Image) -> Image.Image:
    """'I;16' / 'I' greyscale: scale the 16-bit range down instead of clipping at 255."""
    values = np.asarray(img, dtype=np.int64)
    if values.max(initial=0) > 255:
        values = values >> 8
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F")


def _reduce(img: Image.Image, min_side: int) -> Image.Image:
    """Shrink by the largest integer factor that keeps the short side at least ``2 * min_side``."""
    if min_side <= 0 or img.mode not in _REDUCIBLE_MODES:
        return img
    factor = min(img.size) // (2 * min_side)
    return img.reduce(factor) if factor >= 2 else img


def to_rgb(img: Image.Image, *, min_side: int = 0) -> Image.Image:
    """Decode an opened image into 8-bit RGB by the rules in the module docstring."""
    if img.format == "JPEG" and min_side > 0:
        img.draft("RGB", (2 * min_side, 2 * min_side))
    img.load()
    img = ImageOps.exif_transpose(img) or img
    img = _reduce(img, min_side)  # palette and 16-bit modes are reduced below, once converted
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = _sixteen_bit_to_8(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return _reduce(Image.alpha_composite(canvas, rgba).convert("RGB"), min_side)
    return _reduce(img if img.mode == "RGB" else img.convert("RGB"), min_side)


def load_rgb(source: ImageSource, *, min_side: int = 0) -> Image.Image:
    """A trusted image file or bytes -> RGB pixels (training data, evaluation, the command line)."""
    with open_image(source) as img:
        return to_rgb(img, min_side=min_side)


class ImagePreprocessor:
    """Resize the short side, centre-crop, scale to [0, 1] and normalise, as the backbone expects."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        self.cfg = cfg
        resample = T.InterpolationMode(cfg.interpolation)
        self.eval_transform = T.Compose([
            T.PILToTensor(),
            T.Resize(cfg.effective_resize, interpolation=resample, antialias=True),
            T.CenterCrop(cfg.image_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(cfg.mean), list(cfg.std)),
        ])
        self.train_transform = T.Compose([
            T.PILToTensor(),
            T.RandomResizedCrop(cfg.image_size, scale=(0.6, 1.0), interpolation=resample, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(cfg.mean), list(cfg.std)),
        ])

    @property
    def min_side(self) -> int:
        """The short side images are resized to; JPEG draft decoding never goes below twice this."""
        return self.cfg.effective_resize

    def __call__(self, image: Image.Image, *, augment: bool = False) -> torch.Tensor:
        return (self.train_transform if augment else self.eval_transform)(image)

    def load(self, source: ImageSource, *, augment: bool = False) -> torch.Tensor:
        """Decode (:func:`load_rgb`) and preprocess one trusted image."""
        return self(load_rgb(source, min_side=self.min_side), augment=augment)

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self(img) for img in images])

    def identity(self) -> str:
        """A key that changes whenever the pixels reaching the backbone would."""
        fields = {k: self.cfg.model_dump(mode="json")[k] for k in ("image_size", "mean", "std")}
        if self.cfg.interpolation != "bilinear":  # bilinear caches keep the keys they always had
            fields["interpolation"] = self.cfg.interpolation
        fields["resize"] = self.cfg.effective_resize
        fields["decode"] = DECODE_VERSION
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
