"""The caption pipeline: decode (thread pool) -> encode (micro-batched) -> search (micro-batched), and for
the generative modes beam search (micro-batched) and, in hybrid, the re-scoring of every candidate by the
retrieval model (micro-batched).

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
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from transresnet.config import DecodingConfig
from transresnet.encode import encode_photo_queries

from .batching import MicroBatcher
from .bundle import Bundle
from .errors import Overloaded, StageTimeout
from .generating import (
    Candidate,
    GenerateJob,
    Generation,
    Generator,
    RescoreJob,
    consensus_scores,
    generate_jobs,
    generated_candidates,
    hybrid_candidates,
    rescore_jobs,
)
from .imaging import ImageProbe, decode_image, probe_image

if TYPE_CHECKING:
    from transresnet.images import ImagePreprocessor
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


@dataclass(frozen=True)
class CaptionPlan:
    """What one caption request asks for, resolved: the mode, the models and each personality's slots."""

    mode: str
    bundle: Bundle
    trait_ids: tuple[int, ...]
    """Retrieval trait slots, one per requested personality."""
    k: int
    generator: Generator | None = None
    generator_traits: tuple[int, ...] = ()
    """The generator's slots for the same personalities (generate and hybrid)."""
    decoding: DecodingConfig | None = None
    consensus_k: int | None = None
    """Consensus re-ranking against this many nearest index captions (generate and hybrid); None = off."""


@dataclass
class Captioning:
    candidates: list[list[Candidate]]
    """One ranked list per requested personality."""
    timings_s: dict[str, float]
    batch_sizes: dict[str, int]
    """Requests batched together with this one, per batched stage it went through."""
    decode_steps: int | None = None


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


async def both(first: Awaitable[Item], second: Awaitable[Any]) -> tuple[Item, Any]:
    """Await two stages side by side; if either fails (or the caller is cancelled) the other is cancelled,
    and the first error is raised as itself (not wrapped in an exception group)."""
    tasks = (asyncio.ensure_future(first), asyncio.ensure_future(second))
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return tasks[0].result(), tasks[1].result()
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


class Ranker:
    """Owns the decode pool and the batch workers; ``caption`` is the whole request path (``rank``: retrieval)."""

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
        self.generator: MicroBatcher[GenerateJob, Generation] | None = None
        self.rescorer: MicroBatcher[RescoreJob, list[np.ndarray]] | None = None
        if settings.generator is not None:
            self.generator = MicroBatcher(
                generate_jobs, name="generate", max_batch=settings.effective_max_generate_batch, max_wait_s=wait_s,
                expect_more=lambda: self._decoding > 0, on_batch=lambda n, _: metrics.observe_batch("generate", n))
            self.rescorer = MicroBatcher(
                rescore_jobs, name="rescore", max_batch=settings.effective_max_batch, max_wait_s=wait_s,
                on_batch=lambda n, _: metrics.observe_batch("rescore", n))

    @property
    def _batchers(self) -> list[MicroBatcher]:
        return [b for b in (self.encoder, self.searcher, self.generator, self.rescorer) if b is not None]

    def start(self) -> None:
        for batcher in self._batchers:
            batcher.start()

    def stop(self) -> None:
        for batcher in self._batchers:
            batcher.stop()
        self._decode_pool.shutdown(wait=True, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return all(batcher.alive for batcher in self._batchers)

    def _probe(self, min_side: int, data: bytes) -> ImageProbe:
        return probe_image(data, max_bytes=self.settings.max_upload_bytes, max_pixels=self.settings.max_pixels,
                           min_side=min_side)

    def _decode(self, preprocessors: Sequence[ImagePreprocessor], min_side: int, data: bytes) -> list[torch.Tensor]:
        """One decode of the upload, preprocessed for each model (once when their preprocessing is the same)."""
        image = decode_image(data, max_bytes=self.settings.max_upload_bytes, max_pixels=self.settings.max_pixels,
                             min_side=min_side)
        keys = [p.identity() for p in preprocessors]
        done: dict[str, torch.Tensor] = {}
        for key, preprocessor in zip(keys, preprocessors, strict=True):
            if key not in done:
                done[key] = preprocessor(image)
        return [done[key] for key in keys]

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

    async def _decode_within_budget(self, preprocessors: Sequence[ImagePreprocessor], min_side: int,
                                    data: bytes) -> list[torch.Tensor]:
        probe = await self._in_pool(self._probe, min_side, data)
        cost = self.decode_budget.clamp(probe.decode_bytes)
        await self.decode_budget.acquire(cost)
        return await self._in_pool(self._decode, preprocessors, min_side, data,
                                   on_done=functools.partial(self.decode_budget.release, cost))

    async def _pixels(self, upload: Upload, preprocessors: Sequence[ImagePreprocessor],
                      timings: dict[str, float]) -> list[torch.Tensor]:
        """The decode stage; the upload's bytes are released once decoded."""
        start = time.perf_counter()
        min_side = max(p.min_side for p in preprocessors)  # decoded once, large enough for every model
        self._decoding += 1  # counted from the start, so the batch workers know this request is coming
        try:
            return await self._stage("decode", self._decode_within_budget(preprocessors, min_side, upload.take()))
        finally:
            self._decoding -= 1
            timings["decode"] = time.perf_counter() - start

    async def _retrieve(self, bundle: Bundle, pixels: torch.Tensor, trait_ids: tuple[int, ...], k: int,
                        timings: dict[str, float], sizes: dict[str, int]) -> tuple[list[list[Any]], np.ndarray]:
        """Encode and search: the ranked hits per personality, and the query vectors."""
        self._encoding += 1
        try:
            queries, enc = await self._stage("encode", self.encoder.submit(EncodeJob(bundle, pixels, trait_ids)))
        finally:
            self._encoding -= 1
        hits, srch = await self._stage("search", self.searcher.submit(SearchJob(bundle, queries, k)))
        timings.update(encode_queue=enc.wait_s, encode=enc.run_s, search_queue=srch.wait_s, search=srch.run_s)
        sizes.update(encode=enc.size, search=srch.size)
        return hits, queries

    async def _generate(self, plan: CaptionPlan, pixels: torch.Tensor, n_best: int, timings: dict[str, float],
                        sizes: dict[str, int]) -> Generation:
        assert self.generator is not None and plan.generator is not None and plan.decoding is not None
        job = GenerateJob(plan.generator, pixels, plan.generator_traits, plan.decoding, n_best)
        generation, info = await self._stage("generate", self.generator.submit(job))
        timings.update(generate_queue=info.wait_s, generate=info.run_s)
        sizes["generate"] = info.size
        self.metrics.observe_decode_steps(generation.steps)
        return generation

    async def _rescore(self, bundle: Bundle, queries: np.ndarray, texts: list[tuple[str, ...]],
                       timings: dict[str, float], sizes: dict[str, int]) -> list[np.ndarray]:
        assert self.rescorer is not None
        scores, info = await self._stage("rescore", self.rescorer.submit(RescoreJob(bundle, queries, tuple(texts))))
        timings.update(rescore_queue=info.wait_s, rescore=info.run_s)
        sizes["rescore"] = info.size
        return scores

    async def rank(self, bundle: Bundle, upload: Upload, trait_ids: Sequence[int], k: int) -> Ranking:
        """Decode, encode, search. Cancelling the calling task (the client went away) takes the request out of
        whichever stage or queue it is in."""
        start = time.perf_counter()
        timings: dict[str, float] = {}
        sizes: dict[str, int] = {}
        (pixels,) = await self._pixels(upload, [bundle.preprocessor], timings)
        hits, _ = await self._retrieve(bundle, pixels, tuple(trait_ids), k, timings, sizes)
        timings["total"] = time.perf_counter() - start
        self.metrics.observe_stages(timings)
        return Ranking(hits, timings, sizes["encode"], sizes["search"])

    async def _consensus(self, plan: CaptionPlan, hits: list[list[Any]], generation: Generation,
                         timings: dict[str, float]) -> list[np.ndarray]:
        """Each candidate's agreement with its personality's ``consensus_k`` nearest captions (the first hits),
        off the event loop; candidates are the hits (hybrid only) and then the beams, as hybrid_candidates
        takes them."""
        assert plan.consensus_k is not None
        hybrid = plan.mode == "hybrid"
        rows = [([h.caption for h in row] if hybrid else [], [b.caption for b in beams],
                 [h.caption for h in row[:plan.consensus_k]])
                for row, beams in zip(hits, generation.beams, strict=True)]
        start = time.perf_counter()
        try:
            return await self._stage("consensus", asyncio.to_thread(consensus_scores, plan.bundle.consensus, rows))
        finally:
            timings["consensus"] = time.perf_counter() - start

    async def _retrieve_and_generate(self, plan: CaptionPlan, upload: Upload, timings: dict[str, float],
                                     sizes: dict[str, int]) -> tuple[list[list[Any]], np.ndarray, Generation]:
        """Decode once for both models, then retrieval and beam search side by side. Retrieval fetches the
        hybrid's k and the consensus neighbours, whichever is more."""
        assert plan.generator is not None and plan.decoding is not None
        retrieval_pixels, generator_pixels = await self._pixels(
            upload, [plan.bundle.preprocessor, plan.generator.preprocessor], timings)
        wanted = max(plan.k if plan.mode == "hybrid" else 0, plan.consensus_k or 0)
        (hits, queries), generation = await both(
            self._retrieve(plan.bundle, retrieval_pixels, plan.trait_ids, min(wanted, len(plan.bundle.index)),
                           timings, sizes),
            self._generate(plan, generator_pixels, plan.decoding.beam_size, timings, sizes))
        return hits, queries, generation

    async def caption(self, plan: CaptionPlan, upload: Upload) -> Captioning:
        """The request path of ``plan.mode``: retrieve (decode, encode, search), generate (decode, beam
        search) or hybrid (decode once; retrieval and beam search side by side; every candidate re-scored
        by the retrieval model). With ``plan.consensus_k``, generate and hybrid rank their candidates by
        agreement with the photo's nearest index captions instead."""
        if plan.mode == "retrieve":
            ranking = await self.rank(plan.bundle, upload, plan.trait_ids, plan.k)
            candidates = [[Candidate(str(h.id), h.caption, float(h.score), "retrieved", dict(h.metadata or {}))
                           for h in hits] for hits in ranking.hits]
            return Captioning(candidates, ranking.timings_s, {"encode": ranking.encode_batch,
                                                              "search": ranking.search_batch})
        assert plan.generator is not None and plan.decoding is not None
        start = time.perf_counter()
        timings: dict[str, float] = {}
        sizes: dict[str, int] = {}
        if plan.mode == "generate" and plan.consensus_k is None:
            (pixels,) = await self._pixels(upload, [plan.generator.preprocessor], timings)
            generation = await self._generate(plan, pixels, min(plan.k, plan.decoding.beam_size), timings, sizes)
            candidates = [generated_candidates(beams, plan.k) for beams in generation.beams]
        else:
            hits, queries, generation = await self._retrieve_and_generate(plan, upload, timings, sizes)
            if plan.consensus_k is None:
                texts = [tuple(h.caption for h in row) + tuple(b.caption for b in beams)
                         for row, beams in zip(hits, generation.beams, strict=True)]
                scores = await self._rescore(plan.bundle, queries, texts, timings, sizes)
            else:
                scores = await self._consensus(plan, hits, generation, timings)
                if plan.mode == "generate":  # the neighbours only judge; they are not candidates
                    hits = [[] for _ in hits]
            candidates = [hybrid_candidates(row, beams, row_scores, plan.k)
                          for row, beams, row_scores in zip(hits, generation.beams, scores, strict=True)]
        timings["total"] = time.perf_counter() - start
        self.metrics.observe_stages(timings)
        return Captioning(candidates, timings, sizes, generation.steps)


class Upload:
    """The uploaded file's bytes, handed to the pipeline exactly once, so nothing else keeps them alive."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def take(self) -> bytes:
        if self._data is None:
            raise RuntimeError("the upload was already handed to the pipeline")
        data, self._data = self._data, None
        return data
