"""Service settings from ``TRANSRESNET_*`` environment variables or a ``.env`` file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from transresnet.options import Device

MAX_K = 100
"""Upper bound of ``k`` (captions per personality); part of the API, so not a setting."""


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRANSRESNET_", env_file=".env", extra="ignore")

    checkpoint: Path | None = None
    """Checkpoint directory (``transresnet train --out RUN`` writes RUN/best); None = the embedded demo."""
    index_root: Path | None = None
    """Index root (serves its current version) or one version directory; None = the embedded demo."""
    demo_dir: Path = Path(".cache/demo")
    """Where the embedded demo's data, checkpoint and index are built once and cached."""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Device = "auto"
    """Where the model runs; auto = the GPU when torch sees one."""
    index_mmap: bool = False
    """Memory-map the index vectors instead of reading them into memory."""

    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    """Largest accepted image file (413 above it)."""
    max_pixels: int = Field(40_000_000, ge=64)
    """Largest accepted width x height, checked from the header before any pixel is decoded."""
    max_personalities: int = Field(16, ge=1)
    """Most personalities one request may ask for."""

    batching: bool = True
    """Micro-batch image encoding and search across concurrent requests."""
    max_batch: int = Field(4, ge=1)
    """Most images encoded in one forward pass. On CPU, 4 costs least per image (larger batches fall out of
    cache); on a GPU use 32 or more."""
    max_search_batch: int = Field(64, ge=1)
    """Most requests searched in one FAISS call (a flat search reads the whole index once per call)."""
    max_wait_ms: float = Field(5.0, ge=0.0)
    """How long the first request of a batch waits for company (never, when no other request is on its way)."""

    cpu_threads: int | None = Field(None, ge=1)
    """Torch intra-op threads (image encoding); None = torch's default (the physical cores)."""
    search_threads: int = Field(1, ge=1)
    """FAISS threads: a flat search is memory-bound, so one thread leaves the other cores to the encoder."""
    decode_threads: int = Field(2, ge=1)
    """Threads that decode and preprocess uploads."""

    admin_token: SecretStr | None = None
    """Bearer token for /v1/admin/*; None disables the admin endpoints."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @property
    def effective_max_batch(self) -> int:
        return self.max_batch if self.batching else 1

    @property
    def effective_max_search_batch(self) -> int:
        return self.max_search_batch if self.batching else 1
