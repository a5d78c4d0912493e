"""Caption vectors and the versioned FAISS caption index.

Public API (imported lazily so ``import index`` stays light)::

    from index import encode_captions, encode_queries           # the one encoding path
    from index import build_index, BuildOptions                 # captions -> published index version
    from index import load_index, CaptionIndex, Hit, IndexLoadError
    from index import read_captions, CaptionTable
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "encode_captions": "index.encode",
    "encode_queries": "index.encode",
    "choose_precision": "index.encode",
    "build_index": "index.build",
    "write_version": "index.build",
    "BuildOptions": "index.build",
    "load_index": "index.search",
    "CaptionIndex": "index.search",
    "Hit": "index.search",
    "IndexLoadError": "index.store",
    "read_captions": "index.captions",
    "CaptionTable": "index.captions",
    "IndexSpec": "index.faiss_index",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'index' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
