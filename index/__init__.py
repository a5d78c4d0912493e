"""``transresnet.index``: the versioned FAISS caption index (build, store, load, search).

Public API (imported lazily so ``import transresnet.index`` stays light)::

    from transresnet.index import build_index, BuildOptions, Published   # captions -> published version
    from transresnet.index import add_captions, remove_captions        # current version +/- captions
    from transresnet.index import load_index, CaptionIndex, Hit, IndexLoadError
    from transresnet.index import read_captions, CaptionTable

Caption and query vectors come from the core's one encoding path, :mod:`transresnet.encode`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_index": "build",
    "write_version": "build",
    "add_captions": "incremental",
    "remove_captions": "incremental",
    "BuildOptions": "options",
    "Published": "build",
    "load_index": "search",
    "CaptionIndex": "search",
    "Hit": "search",
    "IndexLoadError": "store",
    "read_captions": "captions",
    "CaptionTable": "captions",
    "IndexSpec": "faiss_index",
    "Captioner": "captioner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
