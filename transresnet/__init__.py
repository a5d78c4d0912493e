"""transresnet: personality captions for photos (TransResNet retrieval, a FAISS caption index, a service).

The public Python API, loaded on first use so that ``import transresnet.<module>`` stays light::

    from transresnet import Captioner
    captioner = Captioner.load("runs/flickr8k/best", "indexes/flickr8k")
    captioner.rank("photo.jpg", ["Sweet", "Sarcastic"], k=5)

This module is the package's front door and sits with the entry points in the layering
(docs/architecture.md): library modules import their neighbours directly, never from here.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Captioner": "transresnet.index.captioner",
    "Ranking": "transresnet.index.captioner",
    "RankedCaption": "transresnet.index.captioner",
    "load_checkpoint": "transresnet.checkpoint",
    "load_index": "transresnet.index.search",
    "build_index": "transresnet.index.build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'transresnet' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
