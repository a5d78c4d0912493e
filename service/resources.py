"""What the app serves: the current bundle (checkpoint + index) and the ranking workers, with hot swap.

A reload loads and warms the new bundle off the event loop while the old one keeps serving, then swaps
one reference. Requests hold the bundle they started with, so none is dropped or fails during a swap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .bundle import Bundle, load_bundle
from .errors import NotReady, ReloadFailed
from .generating import GenerateJob, Generator, generate_jobs, load_generator_bundle
from .metrics import ServiceMetrics
from .ranking import EncodeJob, Ranker, SearchJob, encode_jobs, search_jobs
from .settings import ServiceSettings

logger = logging.getLogger(__name__)


def configure_threads(settings: ServiceSettings) -> None:
    """Torch's intra-op threads (a process-wide setting that each thread picks up on its first torch op).
    FAISS's count is per thread: the search worker sets its own (``ranking.set_search_threads``)."""
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)


def warm_up(bundle: Bundle) -> None:
    """One request's worth of work, so the first real request does not pay for lazy initialisation."""
    size = bundle.preprocessor.cfg.image_size
    pixels = torch.zeros(3, size, size)
    (queries,) = encode_jobs([EncodeJob(bundle, pixels, (0,))])
    search_jobs([SearchJob(bundle, queries, 1)])
    if not np.isfinite(queries).all():
        raise ValueError(f"checkpoint {bundle.checkpoint.path} produces non-finite query vectors")


def warm_up_generator(generator: Generator) -> None:
    """One short beam search, so the first generate request does not pay for lazy initialisation."""
    size = generator.preprocessor.cfg.image_size
    job = GenerateJob(generator, torch.zeros(3, size, size), (0,), generator.decoding(1, 2), 1)
    generate_jobs([job])


def load_generator(settings: ServiceSettings) -> Generator | None:
    if settings.generator is None:
        return None
    generator = load_generator_bundle(settings.generator, device=settings.device)
    warm_up_generator(generator)
    return generator


class Resources:
    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        if settings.checkpoint is None or settings.index_root is None:
            raise ValueError("the service needs a checkpoint and an index root (TRANSRESNET_CHECKPOINT, "
                             "TRANSRESNET_INDEX_ROOT); `transresnet serve` builds a demo pair when both are unset")
        self.settings = settings
        self.metrics = metrics
        self.ranker = Ranker(settings, metrics)
        self._bundle: Bundle | None = None
        self.generator: Generator | None = None
        """The caption generator (generate and hybrid modes), loaded once at start-up; None = retrieval only."""
        self._reload_lock = asyncio.Lock()

    @property
    def bundle(self) -> Bundle:
        if self._bundle is None:
            raise NotReady("the model and index are still loading; retry shortly")
        return self._bundle

    @property
    def ready(self) -> bool:
        return self._bundle is not None and self.ranker.alive

    def _load(self, checkpoint_path: Path, reuse_checkpoint: bool, *, fallback: bool = False) -> Bundle:
        current = self._bundle.checkpoint if (reuse_checkpoint and self._bundle) else None
        bundle = load_bundle(checkpoint_path, self.settings.index_root, device=self.settings.device,
                             mmap=self.settings.index_mmap, checkpoint=current, fallback=fallback,
                             placement=self.settings.index_placement, image_precision=self.settings.image_precision)
        warm_up(bundle)
        if self.settings.generator is not None and self.settings.consensus_k:
            bundle.consensus  # noqa: B018 - built here, off the event loop, before any request can use it
        return bundle

    def _install(self, bundle: Bundle) -> None:
        # The search batch follows the placement before the swap: the first batch on a GPU index is a large one.
        search_batch = self.settings.search_batch_for(bundle.index.placement.on_gpu)
        self.ranker.searcher.resize(search_batch)
        self._bundle = bundle
        self.metrics.set_serving(bundle.model_info, bundle.index_info)
        self.metrics.set_index_fallback(bundle.index_fallback)
        self.metrics.set_placement(bundle.index.placement.to_dict(), search_batch)

    @property
    def reloading(self) -> bool:
        """A reload is loading a new bundle now (the index follower waits for the next poll instead)."""
        return self._reload_lock.locked()

    async def start(self) -> None:
        configure_threads(self.settings)
        # A bad CURRENT at start-up falls back to the newest verified version (loudly: log, /readyz, metrics);
        # a reload keeps serving what it has instead.
        bundle = await asyncio.to_thread(partial(self._load, self.settings.checkpoint, False, fallback=True))
        self.generator = await asyncio.to_thread(load_generator, self.settings)
        if self.generator is not None:
            self.metrics.set_generator(self.generator.info)
        self.ranker.start()
        self._install(bundle)

    async def reload(self, checkpoint: Path | None = None) -> tuple[Bundle, Bundle]:
        """Swap in the index root's newest version (and ``checkpoint`` if given); returns (old, new)."""
        async with self._reload_lock:
            old = self.bundle
            start = time.perf_counter()
            try:
                new = await asyncio.to_thread(self._load, checkpoint or old.checkpoint.path, checkpoint is None)
            except Exception as err:  # corrupt or mismatched files: refuse, keep the old bundle serving
                self.metrics.reloads.labels("failed").inc()
                logger.warning("reload refused, still serving index %s: %s", old.index.version, err)
                raise ReloadFailed(f"{err}; still serving model {old.model_info['version']} with index "
                                   f"{old.index.version}", serving_index_version=str(old.index.version)) from None
            self._install(new)
            self.metrics.reloads.labels("ok").inc()
            logger.info("reloaded in %.2fs: index %s -> %s, model %s -> %s", time.perf_counter() - start,
                        old.index.version, new.index.version, old.model_info["version"], new.model_info["version"])
            return old, new

    async def close(self) -> None:
        await asyncio.to_thread(self.ranker.stop)
        self._bundle = None
