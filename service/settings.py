"""Service settings from ``TRANSRESNET_*`` environment variables or a ``.env`` file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from transresnet.options import Device, ImagePrecision, IndexPlacement

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
    image_precision: ImagePrecision = "float32"
    """How the image encoder runs: float32 (channels-last weights), channels_last, bfloat16, compile, onnx or
    int8 (ONNX Runtime, the onnx extra), openvino or openvino_bf16
    (OpenVINO, the openvino extra), each checked against float32 on the checkpoint's held-out photos at
    load; or auto, the fastest that passes (its choice and why in the log). float32 by default: the answers
    then match the float32 model exactly, where auto's int8 may move scores (cosine >= 0.99); docs/results.md
    has the speed of each on the shipped backbones."""
    index_mmap: bool = False
    """Memory-map the index vectors instead of reading them into memory (such an index is searched on CPU)."""
    index_placement: IndexPlacement = "auto"
    """Where the caption index is searched when FAISS sees GPUs (faiss-gpu): auto or shard = the one GPU, or
    the vectors sharded over all of them (memory adds up); replicate = a full copy on each GPU (queries split
    between them: more throughput, no more capacity; sharded instead when a copy does not fit); cpu = never a
    GPU. An index that does not fit the GPUs' free memory, or HNSW, stays on CPU. The choice and its reason
    are logged and shown in /readyz (``index.placement``) and /metrics."""
    follow_index: float | None = Field(None, gt=0)
    """Poll the index root's CURRENT every this many seconds and hot-swap to the version it names, through
    the same path as POST /v1/admin/reload (so replicas serving one INDEX_ROOT converge without an operator
    calling each). A version that fails to load (corrupt, or built for another checkpoint) is refused once,
    logged and counted, and the old one keeps serving; it is retried only after a back-off. Needs an
    INDEX_ROOT (not a version directory: start-up fails; not the embedded demo: ignored with a warning).
    None = only reload when asked."""

    generator: Path | None = None
    """A caption-generator checkpoint (``transresnet train`` with a showtell, showatttell or updown config
    writes RUN/best), served beside the retrieval pair: POST /v1/captions ``mode`` generate or hybrid. Loaded
    once at start-up; a reload of the retrieval pair keeps it. None = retrieval only."""
    max_beam_size: int = Field(8, ge=1, le=64)
    """Largest beam a request may ask for (decode cost grows with it)."""
    max_generate_length: int = Field(30, ge=1, le=100)
    """Most words a request may ask a generated caption to have."""
    consensus_k: int = Field(10, ge=0, le=100)
    """Nearest index captions each candidate is compared with when a request asks for consensus re-ranking
    (Devlin et al. 2015; 10 is what docs/results.md measured). With a generator served, the index's n-gram
    document frequencies are kept in memory for it (about 4 s and 200 MB for 39k captions, built at load);
    0 turns consensus off and keeps none."""
    max_generate_batch: int = Field(8, ge=1)
    """Most photos decoded together by beam search (each with all its personalities and beams)."""

    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    """Largest accepted image file (413 above it)."""
    max_pixels: int = Field(16_777_216, ge=64)
    """Largest accepted width x height (default 4096 x 4096), checked from the header before any pixel is
    decoded. The model needs a short side of a few hundred pixels (256 for the shipped configs) and decoding
    reduces at most 8x (JPEG draft, PIL ``reduce``), so a 4096-px photo is still decoded at 512 px, twice what
    the model needs; bigger photos only cost memory and time: downscale them before sending."""
    decode_memory_bytes: int = Field(512 * 1024 * 1024, ge=1024 * 1024)
    """Budget for pixels being decoded at once, across all requests (width x height x bytes per pixel read
    from each header, after JPEG draft scaling, plus the RGB copy); uploads wait for room. One image costing
    more than the whole budget is decoded alone."""
    max_personalities: int = Field(16, ge=1)
    """Most personalities one request may ask for."""

    batching: bool = True
    """Micro-batch image encoding and search across concurrent requests."""
    max_batch: int = Field(16, ge=1)
    """Most images encoded in one forward pass. Measured on 2 CPU cores at concurrency 32 (benchmarks/
    service_bench.py, docs/results.md): 16 served 1.3x the requests/s of 4 with the float32 encoder at a lower
    p99, and 1.2x those of 8 with ONNX Runtime; 32 filled no further. A lone request never waits for a batch
    to fill. On a GPU use 32 or more."""
    max_search_batch: int = Field(64, ge=1)
    """Most requests searched in one FAISS call on CPU (a flat search reads the whole index once per call)."""
    max_search_batch_gpu: int = Field(512, ge=1)
    """The same when the index is on GPU(s): a GPU call pays a kernel launch, a host-device copy and the
    merge of its shards whatever its size, and GPU searches are serialised, so large batches amortise that.
    Bounded in practice by ``max_in_flight`` (a batch holds at most the requests in flight)."""
    max_wait_ms: float = Field(5.0, ge=0.0)
    """How long the first request of a batch waits for company (never, when no other request is on its way)."""

    cpu_threads: int | None = Field(None, ge=1)
    """Torch intra-op threads (image encoding); None = torch's default (the physical cores)."""
    search_threads: int = Field(1, ge=1)
    """FAISS threads of the search worker: a flat search is memory-bound, so one thread leaves the other cores
    to the encoder. (Exact search of a few queries goes through numpy's BLAS, whose own thread pool follows
    OPENBLAS_NUM_THREADS, not this setting.)"""
    decode_threads: int = Field(2, ge=1)
    """Threads that decode and preprocess uploads."""

    max_in_flight: int = Field(48, ge=1)
    """Most caption requests admitted at once (decoding, queued or encoding, searching); beyond it POST
    /v1/captions answers 503 with Retry-After at once instead of queueing without bound. The micro-batch
    queues hold at most this many jobs. Default from benchmarks/soak.py on 2 CPU cores with the demo model
    (about 60 requests/s): 48 in flight keeps the p99 of admitted requests under 1 s; scale it with throughput
    x the latency you accept."""
    retry_after_s: int = Field(1, ge=0)
    """The Retry-After header of an overload 503."""
    stage_timeout_s: float = Field(10.0, gt=0.0)
    """Longest a request may spend in one stage (decode, encode, search, each with its queue); over it, 503."""
    read_timeout_s: float = Field(30.0, gt=0.0)
    """Longest a client may take to send a request body (slow uploads get 408 and the connection closed)."""
    header_timeout_s: float = Field(10.0, gt=0.0)
    """Longest a client may take to send the request line and headers (slow headers: connection closed)."""
    keep_alive_s: int = Field(5, ge=1)
    """Idle keep-alive connections are closed after this many seconds (uvicorn ``timeout_keep_alive``)."""
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    """Largest request line plus headers; above it, 431 (from h11 while the head arrives, from the app once
    it is whole)."""
    max_headers: int = Field(100, ge=8)
    """Most request header fields; above it, 431."""

    admin_token: SecretStr | None = None
    """Bearer token for /v1/admin/*; unset, empty or whitespace disables the admin endpoints."""
    reload_roots: list[Path] = Field(default_factory=list)
    """Directories a reload may take a checkpoint from (resolved: ``..`` and symlinks cannot leave them);
    empty = the directory holding the configured checkpoint (e.g. RUN for RUN/best, so RUN/last may be
    reloaded) and the configured index root. As an environment variable, a
    JSON list: TRANSRESNET_RELOAD_ROOTS='["/models"]'."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("admin_token")
    @classmethod
    def _blank_token_disables_admin(cls, value: SecretStr | None) -> SecretStr | None:
        """An empty token must never match an empty Authorization header: blank means disabled."""
        if value is not None and not value.get_secret_value().strip():
            return None
        return value

    @property
    def admin_enabled(self) -> bool:
        return self.admin_token is not None

    @property
    def effective_reload_roots(self) -> list[Path]:
        """The allowed reload roots, resolved (symlinks followed, ``..`` removed)."""
        roots = list(self.reload_roots)
        if not roots:
            roots = [p for p in (self.checkpoint and self.checkpoint.resolve().parent, self.index_root) if p]
        return list(dict.fromkeys(root.resolve() for root in roots))

    @property
    def effective_max_batch(self) -> int:
        return self.max_batch if self.batching else 1

    @property
    def effective_max_generate_batch(self) -> int:
        return self.max_generate_batch if self.batching else 1

    @property
    def effective_max_search_batch(self) -> int:
        return self.max_search_batch if self.batching else 1

    def search_batch_for(self, on_gpu: bool) -> int:
        """Most requests per search call for an index on GPU(s) or on CPU (1 without batching)."""
        if not self.batching:
            return 1
        return self.max_search_batch_gpu if on_gpu else self.max_search_batch
