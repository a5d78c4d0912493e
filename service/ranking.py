"""The ranking pipeline: decode (thread pool) -> encode (micro-batched) -> search (micro-batched).

Each request carries the ``Bundle`` it started with, so a reload never changes the model or index under
an in-flight request; batches are split by bundle, so requests on old and new bundles never mix.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from transresnet.encode import encode_photo_queries

from .batching import MicroBatcher
from .bundle import Bundle
from .errors import Overloaded, StageTimeout
from .imaging import ImageProbe, decode_image, probe_image
from .metrics import ServiceMetrics
from .settings import ServiceSettings

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


@dataclass(frozen=True)
class EncodeJob:
    bundle: Bundle
    pixels: torch.Tensor
    """One preprocessed image (3, H, W)."""
    trait_ids: tuple[int, ...]


@dataclass(frozen=True)
class SearchJob:
    bundle: Bundle
    queries: np.ndarray
    """One query vector per personality (n, D), float32."""
    k: int


@dataclass
class Ranking:
    hits: list[list[Any]]
    """One ranked list of index hits per requested personality."""
    timings_s: dict[str, float]
    encode_batch: int
    search_batch: int


def set_search_threads(threads: int) -> None:
    """FAISS's OpenMP thread count for the calling thread. OpenMP keeps the count per thread (and torch and
    FAISS share it): set in the event loop's thread it would miss the search worker, which would then search
    with every core, and it would cut torch to ``threads`` there. So the search worker sets it itself."""
    import faiss

    faiss.omp_set_num_threads(threads)


def _groups(items: Sequence[Item], key: Callable[[Item], Hashable]) -> dict[Hashable, list[int]]:
    """Positions of the items, grouped by key, in first-seen order."""
    groups: dict[Hashable, list[int]] = {}
    for pos, item in enumerate(items):
        groups.setdefault(key(item), []).append(pos)
    return groups


def encode_jobs(jobs: Sequence[EncodeJob]) -> list[np.ndarray]:
    """Encode every image once, then pair its features with each of its personalities."""
    out: list[np.ndarray] = [np.empty(0)] * len(jobs)
    for positions in _groups(jobs, lambda j: id(j.bundle)).values():
        group = [jobs[p] for p in positions]
        # The core's one photo-query path (also the Python API's): one backbone pass per photo.
        queries = encode_photo_queries(group[0].bundle.checkpoint.model, torch.stack([j.pixels for j in group]),
                                       [j.trait_ids for j in group])
        for pos, chunk in zip(positions, queries, strict=True):
            out[pos] = chunk
    return out


def search_jobs(jobs: Sequence[SearchJob]) -> list[list[list[Any]]]:
    """One FAISS call per (index, k): equal k keeps results identical to searching each request alone."""
    out: list[list[list[Any]]] = [[] for _ in jobs]
    for positions in _groups(jobs, lambda j: (id(j.bundle), j.k)).values():
        group = [jobs[p] for p in positions]
        queries = np.concatenate([j.queries for j in group]) if len(group) > 1 else group[0].queries
        hits = group[0].bundle.index.search(queries, group[0].k)
        start = 0
        for pos, job in zip(positions, group, strict=True):
            out[pos] = hits[start:start + len(job.queries)]
            start += len(job.queries)
    return out


class Admission:
    """At most ``limit`` caption requests in the pipeline; the next one is refused at once (503), never queued."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.active = 0

    @property
    def full(self) -> bool:
        return self.active >= self.limit

    def refusal(self, *, close: bool = False) -> Overloaded:
        """The 503; ``close``: the request body was left unread, so the connection cannot be reused."""
        headers = {"Retry-After": str(self.retry_after_s), **({"Connection": "close"} if close else {})}
        return Overloaded(f"the server is at its limit of {self.limit} caption requests in flight; retry in "
                          f"{self.retry_after_s}s", headers=headers)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.full:
            raise self.refusal(close=True)
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class DecodeBudget:
    """A weighted semaphore over decode memory (bytes), shared by all requests; waiters are served in order.

    A cost larger than the whole budget is clamped to it, so one allowed image always fits (alone).
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def clamp(self, cost: int) -> int:
        return max(1, min(cost, self.total))

    async def acquire(self, cost: int) -> None:
        if not self._waiters and self.free >= cost:
            self.free -= cost
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (cost, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted just as we were cancelled: give it back
                self.release(cost)
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, cost: int) -> None:
        self.free += cost
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            cost, waiter = self._waiters.popleft()
            if not waiter.done():
                self.free -= cost
                waiter.set_result(None)


class Ranker:
    """Owns the decode pool and the two batch workers; ``rank`` is the whole request path."""

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._decoding = 0  # requests in the decode stage: the encoder waits for them only if any exist
        self._encoding = 0  # requests queued for or in encoding: the same for the searcher
        wait_s = settings.max_wait_ms / 1000.0
        self.admission = Admission(settings.max_in_flight, settings.retry_after_s)
        self.decode_budget = DecodeBudget(settings.decode_memory_bytes)
        self._decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.encoder: MicroBatcher[EncodeJob, np.ndarray] = MicroBatcher(
            encode_jobs, name="encode", max_batch=settings.effective_max_batch, max_wait_s=wait_s,
            expect_more=lambda: self._decoding > 0, on_batch=lambda n, _: metrics.observe_batch("encode", n))
        self.searcher: MicroBatcher[SearchJob, list[list[Any]]] = MicroBatcher(
            search_jobs, name="search", max_batch=settings.effective_max_search_batch, max_wait_s=wait_s,
            expect_more=lambda: self._encoding > 0, on_batch=lambda n, _: metrics.observe_batch("search", n),
            on_start=functools.partial(set_search_threads, settings.search_threads))

    def start(self) -> None:
        self.encoder.start()
        self.searcher.start()

    def stop(self) -> None:
        self.encoder.stop()
        self.searcher.stop()
        self._decode_pool.shutdown(wait=True, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self.encoder.alive and self.searcher.alive

    def _probe(self, bundle: Bundle, data: bytes) -> ImageProbe:
        return probe_image(data, max_bytes=self.settings.max_upload_bytes, max_pixels=self.settings.max_pixels,
                           min_side=bundle.min_side)

    def _decode(self, bundle: Bundle, data: bytes) -> torch.Tensor:
        image = decode_image(data, max_bytes=self.settings.max_upload_bytes, max_pixels=self.settings.max_pixels,
                             min_side=bundle.min_side)
        return bundle.preprocessor(image)

    async def _in_pool(self, fn: Callable[..., Item], *args: Any, on_done: Callable[[], None] | None = None) -> Item:
        """``fn(*args)`` on the decode pool. ``on_done`` runs (on the loop) once the work has really finished or
        never started: a cancelled caller stops waiting at once, but a running decode still holds its memory."""
        loop = asyncio.get_running_loop()
        work = self._decode_pool.submit(fn, *args)
        if on_done is not None:
            work.add_done_callback(lambda _: loop.call_soon_threadsafe(on_done))
        return await asyncio.wrap_future(work)

    async def _stage(self, name: str, awaitable: Awaitable[Item]) -> Item:
        try:
            return await asyncio.wait_for(awaitable, self.settings.stage_timeout_s)
        except TimeoutError:
            self.metrics.errors.labels(f"timeout_{name}").inc()
            raise StageTimeout(f"the {name} stage took over {self.settings.stage_timeout_s:g}s; the server is "
                               f"overloaded, retry in {self.settings.retry_after_s}s",
                               headers={"Retry-After": str(self.settings.retry_after_s)}) from None

    async def _decode_within_budget(self, bundle: Bundle, data: bytes) -> torch.Tensor:
        probe = await self._in_pool(self._probe, bundle, data)
        cost = self.decode_budget.clamp(probe.decode_bytes)
        await self.decode_budget.acquire(cost)
        return await self._in_pool(self._decode, bundle, data,
                                   on_done=functools.partial(self.decode_budget.release, cost))

    async def rank(self, bundle: Bundle, upload: Upload, trait_ids: Sequence[int], k: int) -> Ranking:
        """Decode, encode, search. The upload's bytes are released once decoded; cancelling the calling task
        (the client went away) takes the request out of whichever stage or queue it is in."""
        start = time.perf_counter()
        self._decoding += 1  # counted from the start, so the encoder knows this request is coming
        try:
            pixels = await self._stage("decode", self._decode_within_budget(bundle, upload.take()))
            decoded = time.perf_counter()
        finally:
            self._decoding -= 1
        self._encoding += 1
        try:
            queries, enc = await self._stage("encode", self.encoder.submit(EncodeJob(bundle, pixels,
                                                                                     tuple(trait_ids))))
        finally:
            self._encoding -= 1
        del pixels
        hits, srch = await self._stage("search", self.searcher.submit(SearchJob(bundle, queries, k)))
        timings = {"decode": decoded - start, "encode_queue": enc.wait_s, "encode": enc.run_s,
                   "search_queue": srch.wait_s, "search": srch.run_s, "total": time.perf_counter() - start}
        self.metrics.observe_stages(timings)
        return Ranking(hits, timings, enc.size, srch.size)


class Upload:
    """The uploaded file's bytes, handed to the pipeline exactly once, so nothing else keeps them alive."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def take(self) -> bytes:
        if self._data is None:
            raise RuntimeError("the upload was already handed to the pipeline")
        data, self._data = self._data, None
        return data
