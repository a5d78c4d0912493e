"""Micro-batching: requests from the event loop are collected on a dedicated worker thread and run together.

The worker takes the first queued item, then keeps collecting until it has ``max_batch`` items or the first
item has waited ``max_wait_s``, and runs the whole batch in one call. It stops waiting early when
``expect_more()`` says no other request is on its way (a lone request is never delayed for nothing).
Blocking torch/FAISS work therefore never runs on the event loop, and only this one thread touches it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchInfo:
    size: int
    """Items in the batch this item ran in."""
    wait_s: float
    """From submission until the batch started."""
    run_s: float
    """Duration of the batch call."""


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float


class BatcherClosed(RuntimeError):
    pass


_STOP = object()


def _resolve(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():  # the caller went away (cancelled); nothing to deliver
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class MicroBatcher(Generic[T, R]):
    """Runs ``fn(items) -> results`` (same length, same order) on batches of submitted items."""

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, name: str, max_batch: int, max_wait_s: float,
                 expect_more: Callable[[], bool] | None = None,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_start: Callable[[], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.fn = fn
        self.name = name
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self.expect_more = expect_more or (lambda: True)
        self.on_batch = on_batch
        self.on_start = on_start
        """Runs first in the worker thread: per-thread settings such as OpenMP's thread count belong there."""
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._closed = False

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    async def submit(self, item: T) -> tuple[R, BatchInfo]:
        if self._closed:
            raise BatcherClosed(f"the {self.name} worker is shut down")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        pending = _Pending(item, future, loop, time.perf_counter())
        self._queue.put(pending)
        try:
            return await future
        finally:
            # A cancelled caller (client gone, stage timeout) leaves the queue: the worker skips its entry and
            # its item (an image tensor, query vectors) is freed now, not when the worker reaches it.
            pending.item = None

    def resize(self, max_batch: int) -> None:
        """Change the most items per batch (e.g. when a reload moves the index between CPU and GPU); the next
        batch collected uses it. Safe from any thread: the worker reads the attribute once per item."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_batch != self.max_batch:
            logger.info("%s batches: at most %d items (was %d)", self.name, max_batch, self.max_batch)
        self.max_batch = max_batch

    def stop(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side

    def _run(self) -> None:
        if self.on_start is not None:
            self.on_start()
        while True:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._collect(first)
            self._execute(batch)
            if stop:
                break
        self._fail_leftovers()

    def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        batch = [first]
        deadline = first.enqueued + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not self.expect_more():
                    break
                try:
                    nxt = self._queue.get(timeout=min(remaining, 0.001))
                except queue.Empty:
                    continue
            if nxt is _STOP:
                return batch, True
            if not nxt.future.done():  # abandoned entries take no place in a batch
                batch.append(nxt)
        return batch, False

    def _execute(self, batch: list[_Pending]) -> None:
        # Skip callers that already gave up; read each item once (a caller may clear it at any moment).
        live = [(p, p.item) for p in batch if not p.future.done()]
        batch = [p for p, item in live if item is not None]
        items = [item for _, item in live if item is not None]
        del live
        if not batch:
            return
        start = time.perf_counter()
        error: BaseException | None = None
        results: Sequence[Any] = ()
        try:
            results = self.fn(items)
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
        except Exception as err:  # delivered to every caller of this batch; the worker keeps running
            logger.exception("%s batch of %d failed", self.name, len(batch))
            error = err
        run_s = time.perf_counter() - start
        if self.on_batch is not None:
            self.on_batch(len(batch), run_s)
        for i, pending in enumerate(batch):
            info = BatchInfo(size=len(batch), wait_s=start - pending.enqueued, run_s=run_s)
            value = None if error is not None else (results[i], info)
            self._deliver(pending, value, error)
        del items, results

    @staticmethod
    def _deliver(pending: _Pending, value: Any, error: BaseException | None) -> None:
        try:
            pending.loop.call_soon_threadsafe(_resolve, pending.future, value, error)
        except RuntimeError:  # the event loop is closed (shutdown); nobody is waiting any more
            pass

    def _fail_leftovers(self) -> None:
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                return
            if pending is not _STOP:
                self._deliver(pending, None, BatcherClosed(f"the {self.name} worker shut down"))
