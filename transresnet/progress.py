"""The one progress reporter: a tqdm bar on a terminal, a log line every few seconds everywhere else.

Progress bars vanish when output is not a terminal (a container, CI, ``make serve`` behind a pipe), so
long steps there would run in silence. :func:`progress` gives both audiences something: on a terminal
the familiar bar; otherwise an INFO line every ``interval`` seconds with done/total, rate and ETA, e.g.
``caching crop 3 of 9 for 700 photos: 350/700 photos (12.3/s, ETA 28s)``, and one closing line.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

logger = logging.getLogger(__name__)

T = TypeVar("T")
LOG_INTERVAL_S = 5.0


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class LogProgress:
    """The non-terminal reporter: ``update`` counts, a line is logged at most every ``interval`` s."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float = LOG_INTERVAL_S,
                 log: logging.Logger = logger) -> None:
        self.total, self.desc, self.unit, self.interval, self.log = total, desc, unit, interval, log
        self.done = 0
        self.started = self._last = time.monotonic()
        self.postfix = ""

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        of = f"/{self.total}" if self.total else ""
        eta = (f", ETA {_duration((self.total - self.done) / rate)}"
               if self.total and rate > 0 and self.done < self.total else "")
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {self.done}{of} {self.unit} ({rate:.1f}/s{eta}{extra})"

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.log.info("%s", self.line())

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        elapsed = time.monotonic() - self.started
        if elapsed >= self.interval:  # short steps stay quiet; their callers log a summary
            self.log.info("%s, done in %s", self.line(), _duration(elapsed))

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _on_terminal() -> bool:
    return sys.stderr.isatty()


def progress(total: int | None, desc: str, unit: str = "items", *, interval: float | None = None,
             enabled: bool | None = None) -> Any:
    """A reporter with ``update(n)``, ``set_postfix(**kv)`` and ``close()``, usable as a context manager.

    ``enabled``: None = a bar on a terminal and log lines otherwise; False = silent; True = a bar.
    """
    if enabled is False:
        return tqdm(total=total, disable=True)
    if enabled or _on_terminal():
        return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=0.5, dynamic_ncols=True)
    return LogProgress(total, desc, unit, LOG_INTERVAL_S if interval is None else interval)


def track(items: Iterable[T], desc: str, unit: str = "items", *, total: int | None = None,
          enabled: bool | None = None) -> Iterator[T]:
    """Iterate ``items`` with :func:`progress` (total from ``len(items)`` when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(total, desc, unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(1)
