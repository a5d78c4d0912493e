"""Untrusted uploads: byte, pixel and format limits around the core image path (``transresnet.images``).

The limits are checked on the lazily opened header, before any pixel is decoded; the decode itself is
the one every other path uses, so the service sees exactly the pixels training and evaluation saw.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from transresnet.images import open_image, to_rgb

from .errors import ImageTooLarge, InvalidImage

# Formats PIL may try on uploads; plugins that call external programs (EPS -> ghostscript) stay off.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "AVIF", "HEIF")


@functools.cache
def _formats() -> tuple[str, ...]:
    """The allowed formats this Pillow build can open (AVIF/HEIF need optional plugins)."""
    Image.init()
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


def _check_length(data: bytes, max_bytes: int) -> None:
    if not data:
        raise InvalidImage(f"the image file is empty (0 bytes); attach a photo ({_formats_hint()})")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the image is {len(data):,} bytes; the limit is {max_bytes:,} bytes: "
                            "send a smaller or more compressed photo")


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Base64 (optionally a ``data:image/...;base64,`` URL) -> bytes, refusing oversize input before decoding."""
    if text.startswith("data:"):
        _, sep, text = text.partition(",")
        if not sep:
            raise InvalidImage("image_base64 is a data URL without a ',' before the base64 payload")
    text = "".join(text.split())  # line-wrapped base64 (e.g. `base64` without -w0) is fine
    if len(text) * 3 // 4 > max_bytes + 3:
        raise ImageTooLarge(f"the decoded image would exceed the limit of {max_bytes:,} bytes; "
                            "send a smaller or more compressed photo")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidImage(f"image_base64 is not valid base64 ({err}); encode the file bytes with "
                           "standard base64 (A-Z, a-z, 0-9, +, /, = padding)") from None
    _check_length(data, max_bytes)
    return data


@dataclass(frozen=True)
class ImageProbe:
    """What an upload's header says, before any pixel is decoded."""

    width: int
    height: int
    format: str
    decode_bytes: int
    """Memory the decode needs: pixels after JPEG draft scaling x (bytes per decoded pixel + 3 for RGB)."""


_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "RGB": 3,
                    "YCbCr": 3, "RGBA": 4, "CMYK": 4, "I": 4, "F": 4}


def _draft_scale(img: Image.Image, min_side: int) -> int:
    """The JPEG draft scale ``to_rgb`` will decode at (libjpeg scales by 1/2, 1/4 or 1/8)."""
    if img.format != "JPEG" or min_side <= 0:
        return 1
    return next((s for s in (8, 4, 2) if min(img.size) // s >= 2 * min_side), 1)


def _formats_hint() -> str:
    names = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF",
             "MPO": "MPO", "AVIF": "AVIF", "HEIF": "HEIF"}
    shown = [names[f] for f in _formats()]
    return ", ".join(shown[:-1]) + " or " + shown[-1]


def supported_formats() -> list[str]:
    """The upload formats this server accepts (the allowed ones this Pillow build can read)."""
    return list(_formats())


@contextlib.contextmanager
def _opened(data: bytes, *, max_bytes: int, max_pixels: int) -> Iterator[Image.Image]:
    """The lazily opened upload, its size checked; every failure mapped to what the client should fix."""
    _check_length(data, max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = open_image(data, formats=_formats())
        with img:
            # Image.open reads only the header: refuse bombs before any pixel is decoded.
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"the image is {width}x{height} = {width * height:,} pixels; the limit is "
                                    f"{max_pixels:,} pixels: downscale it before sending")
            if width < 1 or height < 1:
                raise InvalidImage(f"the image has no pixels ({width}x{height})")
            yield img
    except (ImageTooLarge, InvalidImage):
        raise
    except UnidentifiedImageError:
        raise InvalidImage(f"the file is not an image this service can read; send {_formats_hint()}") from None
    except Image.DecompressionBombError:
        # Pillow's own header check fires first for absurd sizes (> 2 x Image.MAX_IMAGE_PIXELS).
        raise ImageTooLarge(f"the image header declares far more than the limit of {max_pixels:,} pixels "
                            "(a decompression bomb?): downscale it before sending") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as err:
        # Truncated or corrupt files: PIL reports them as OSError/SyntaxError and friends.
        raise InvalidImage(f"the image could not be decoded ({err}); the file may be truncated or corrupt, "
                           "send the complete file") from None


def probe_image(data: bytes, *, max_bytes: int, max_pixels: int, min_side: int = 0) -> ImageProbe:
    """Header only: the limits checked, and the memory :func:`decode_image` will need."""
    with _opened(data, max_bytes=max_bytes, max_pixels=max_pixels) as img:
        scale = _draft_scale(img, min_side)
        pixels = -(-img.width // scale) * -(-img.height // scale)
        per_pixel = _BYTES_PER_PIXEL.get(img.mode, 4) + 3
        return ImageProbe(img.width, img.height, str(img.format), pixels * per_pixel)


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, min_side: int = 0) -> Image.Image:
    """Untrusted bytes -> RGB image, or ``InvalidImage`` / ``ImageTooLarge`` saying what to fix."""
    with _opened(data, max_bytes=max_bytes, max_pixels=max_pixels) as img:
        return to_rgb(img, min_side=min_side)
