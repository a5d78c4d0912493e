"""The options of an index build: light to import (no faiss), so the CLI derives its flags from them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from transresnet.options import BuildEngine, BuildIndexType, Precision, to_flags


class BuildOptions(BaseModel):
    """Everything besides checkpoint, captions and output that shapes a build: the one definition of the
    `transresnet index build` flags, of the manifest's record of them and of the rebuild hint."""

    model_config = ConfigDict(extra="forbid")

    index_type: BuildIndexType = Field(
        "flat", description="flat = exact; ivf, hnsw, ivfpq = approximate; auto = by size and memory budget")
    keep: int = Field(3, ge=1, description="index versions kept (the current one always)")
    batch_size: int = Field(128, ge=1, description="captions per encoder batch")
    precision: Precision = Field(
        "auto", description="encoder precision; reduced precision is used only within tolerance of float32")
    recall_target: float = Field(0.95, gt=0.0, le=1.0,
                                 description="recall@k against exact search the approximate index is tuned to")
    recall_k: int = Field(10, ge=1, description="the k of the recall target")
    queries: Path | None = Field(
        None, description=".npy of real query vectors (n, D) for tuning; default: queries of held-out photos "
        "(--tune-photos), else held-out caption vectors")
    tune_queries: int = Field(1000, ge=1, description="tuning queries used at most (photo queries or held-out "
                              "caption vectors)")
    tune_photos: int = Field(
        100, ge=0, description="held-out photos of the checkpoint's training data whose queries (in every "
        "personality) tune an approximate index, where they are on this machine; 0 = tune with held-out caption "
        "vectors")
    memory_budget: str | None = Field(
        None, description="memory budget for --type auto, e.g. 4G (default: half the RAM, at most 16G)")
    nlist: int | None = Field(None, ge=1, description="IVF lists (default about 4 sqrt(n))")
    pq_m: int | None = Field(None, ge=1, description="PQ bytes per vector (must divide the dimension)")
    hnsw_m: int = Field(32, ge=2, description="HNSW graph degree")
    ef_construction: int = Field(80, ge=1, description="HNSW build beam width")
    refine: bool = Field(False, description="ivfpq: re-rank candidates with exact vectors")
    seed: int = Field(0, description="seed of training samples and tuning queries")
    engine: BuildEngine = Field(
        "local", description="local = encode in this process; ray = read, encode and add on a Ray cluster "
        "(pip install 'transresnet[distributed]')")
    ray_address: str | None = Field(
        None, description="ray: address of an existing cluster, e.g. ray://head:10001 or auto (default: start "
        "a local Ray instance on this machine)")
    workers: int = Field(2, ge=1, description="ray: encoding actors (each loads the checkpoint once)")
    cpus_per_worker: int = Field(1, ge=1, description="ray: CPUs (and torch threads) per encoding actor")
    gpus_per_worker: float = Field(0.0, ge=0.0, description="ray: GPUs per encoding actor (0 = encode on CPUs)")

    @model_validator(mode="after")
    def _ray_flags_need_ray(self) -> BuildOptions:
        defaults = type(self).model_fields
        self.refuse_ray_flags(name for name in RAY_FLAGS if getattr(self, name) != defaults[name].default)
        return self

    def refuse_ray_flags(self, given: Iterable[str]) -> None:
        """ValueError naming the ray-only options among ``given`` when the engine is local. The model checks
        the values that differ from their defaults; the CLI also checks the flags given (``--workers 2``
        equals the default, yet says the user expected Ray)."""
        given = set(given)
        stray = [flag for name, flag in RAY_FLAGS.items() if name in given]
        if self.engine == "local" and stray:
            verb = "applies" if len(stray) == 1 else "apply"
            raise ValueError(f"{', '.join(stray)} {verb} only to --engine ray; add --engine ray or drop "
                             f"{'it' if len(stray) == 1 else 'them'}")

    def flags(self) -> list[str]:
        """The `transresnet index build` flags that reproduce this build (see :data:`FLAG_NAMES`)."""
        return to_flags(self, renames=FLAG_NAMES, always=("index_type",), exclude=("keep",))


FLAG_NAMES = {"index_type": "--type"}
"""Fields whose flag is not simply ``--field-name``."""
RAY_FLAGS = {"ray_address": "--ray-address", "workers": "--workers", "cpus_per_worker": "--cpus-per-worker",
             "gpus_per_worker": "--gpus-per-worker"}
"""The fields that only the ray engine reads."""


class UpdateOptions(BaseModel):
    """The flags of `transresnet index add` and `index remove`; unset ones keep the parent version's
    recorded build options (the index type, its parameters and the recall target always do)."""

    model_config = ConfigDict(extra="forbid")

    keep: int | None = Field(None, ge=1, description="index versions kept (default: as the parent was built)")
    batch_size: int | None = Field(None, ge=1, description="captions per encoder batch (default: the parent's)")
    precision: Precision | None = Field(None, description="encoder precision (default: the parent's)")

    def over(self, parent: BuildOptions) -> BuildOptions:
        """The parent's build options with the flags given here replacing theirs."""
        given = {name: value for name, value in self.model_dump().items() if value is not None}
        return BuildOptions.model_validate({**parent.model_dump(), **given})
