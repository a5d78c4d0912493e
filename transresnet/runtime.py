"""Process-wide defaults and small context helpers shared by every entry point and library layer."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # light at import: the CLI calls apply_runtime_defaults before torch loads
    import torch

RUNTIME_DEFAULTS = {
    # Idle OpenMP threads that spin steal the cores torch and FAISS need on small shared machines
    # (measured: index build 3x faster with PASSIVE). Read when torch or faiss load their OpenMP runtime.
    "OMP_WAIT_POLICY": "PASSIVE",
    # Tokenizers' own thread pool deadlocks after a fork (DataLoader workers, uvicorn reloads).
    "TOKENIZERS_PARALLELISM": "false",
    # transformers' "Loading weights" bars and info lines mean nothing to a user of this tool.
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def apply_runtime_defaults() -> None:
    """Set the defaults above unless the user set them; call before torch or faiss do real work."""
    for name, value in RUNTIME_DEFAULTS.items():
        os.environ.setdefault(name, value)


def utc_timestamp(when: float | None = None) -> str:
    """ISO 8601 UTC time to the second, e.g. ``2026-12-01T08:43:20Z`` (reports, manifests, markers)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if when is None else when))


def _any_training(module: torch.nn.Module) -> bool:
    # A plain walk over the children: Module.modules() builds a memo and names, ten times slower.
    stack = [module]
    while stack:
        current = stack.pop()
        if current.training:
            return True
        stack.extend(child for child in current._modules.values() if child is not None)
    return False


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``module`` without dropout or batch-norm updates, restoring the caller's mode even on errors."""
    if not _any_training(module):
        # Already in eval mode (the service's models always are): module.eval() walks every submodule
        # twice, which costs milliseconds per request on a model with a Transformer inside.
        yield module
        return
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
