"""Device choice shared by training, evaluation, indexing and serving."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' is the GPU when torch sees one, else the CPU; asking for 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no GPU; use device 'auto' or 'cpu'")
    return torch.device(name)
