"""Following an index root: replicas serving one INDEX_ROOT converge on the version its CURRENT names.

With ``TRANSRESNET_FOLLOW_INDEX=SECONDS`` an asyncio task, started and stopped by the app lifespan, reads
CURRENT every SECONDS (a small file read, done off the event loop: on a network filesystem it can block)
and, when it names a version other than the one served, calls ``Resources.reload``: the path POST
/v1/admin/reload takes, so the new version is checked against the checkpoint, warmed up and swapped in
without dropping a request. A version that fails to load is refused: the old one keeps serving, the
refusal is logged once and counted once (``transresnet_index_follow{outcome="refused"}``), and that version
is tried again only after a back-off (files copied to a shared filesystem may still be arriving), never on
every poll. An admin reload retries it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from transresnet.index.store import VERSIONS, IndexLoadError, is_version_dir, read_current

from .errors import ReloadFailed
from .resources import Resources
from .settings import ServiceSettings

logger = logging.getLogger(__name__)

REFUSED_RETRY_S = 60.0
"""A refused version is tried again this long after its refusal, then after twice as long each time..."""
REFUSED_RETRY_MAX_S = 900.0
"""... up to this: a full load (checksums included) of a big index every few seconds would starve serving."""


def follow_enabled(settings: ServiceSettings) -> bool:
    """Whether to follow the index root: ValueError when the setting cannot work (a version directory never
    changes), a warning and False for the embedded demo (built once, never republished)."""
    if settings.follow_index is None or settings.index_root is None:
        return False
    root = settings.index_root
    if is_version_dir(root):
        above = f" ({root.parent.parent})" if root.parent.name == VERSIONS else ""
        raise ValueError(f"TRANSRESNET_FOLLOW_INDEX needs an INDEX_ROOT (the folder holding CURRENT and {VERSIONS}/), "
                         f"but TRANSRESNET_INDEX_ROOT={root} is one version directory, which never changes: set "
                         f"it to its index root{above}, or unset TRANSRESNET_FOLLOW_INDEX")
    if root.resolve().is_relative_to(settings.demo_dir.resolve()):
        logger.warning("TRANSRESNET_FOLLOW_INDEX is ignored: %s is the embedded demo's index, built once and never "
                       "republished; serve your own INDEX_ROOT to follow it", root)
        return False
    return True


@dataclass
class _Refusal:
    delay_s: float
    retry_at: float


class IndexFollower:
    """Polls ``root``/CURRENT every ``interval_s`` and hot-swaps ``resources`` to the version it names."""

    def __init__(self, resources: Resources, root: Path, interval_s: float) -> None:
        self.resources = resources
        self.root = root
        self.interval_s = interval_s
        self._refused: dict[str, _Refusal] = {}
        self._pointer_problem: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="index-follow")
        logger.info("following %s: its CURRENT is read every %gs and a new version is swapped in",
                    self.root / "CURRENT", self.interval_s)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll()
            except Exception:  # noqa: BLE001 - one failed poll must not end following
                logger.exception("index follow: polling %s failed; trying again in %gs", self.root, self.interval_s)

    async def poll(self) -> str:
        """One look at CURRENT. Returns what it did: unchanged, reloaded, refused, waiting (a refused version
        before its retry), busy (another reload is running), pointer_unreadable or moved (CURRENT changed
        while a refused load ran: the next poll looks again)."""
        wanted = await self._read_pointer()
        if wanted is None:
            return "pointer_unreadable"
        index = self.resources.bundle.index
        if wanted == index.version and index.fallback is None:
            return "unchanged"  # (a start-up fallback whose CURRENT was since fixed to it reloads, to clear it)
        refusal = self._refused.get(wanted)
        if refusal is not None and time.monotonic() < refusal.retry_at:
            return "waiting"
        if self.resources.reloading:
            return "busy"
        try:
            old, new = await self.resources.reload()
        except ReloadFailed as err:
            return await self._refuse(wanted, err)
        self._refused.pop(new.index.version, None)
        self.resources.metrics.index_follow.labels("reloaded").inc()
        logger.info("index follow: %s names %s; now serving it (was %s)", self.root / "CURRENT",
                    new.index.version, old.index.version)
        return "reloaded"

    async def _read_pointer(self) -> str | None:
        """CURRENT's text, or None (logged and counted once per problem) when it is missing or unreadable."""
        try:
            name = await asyncio.to_thread(read_current, self.root)
            problem = None if name else f"{self.root / 'CURRENT'} is missing or empty"
        except IndexLoadError as err:
            name, problem = None, str(err)
        if problem is None:
            if self._pointer_problem is not None:
                logger.info("index follow: %s is readable again", self.root / "CURRENT")
            self._pointer_problem = None
        elif problem != self._pointer_problem:
            self._pointer_problem = problem
            self.resources.metrics.index_follow.labels("pointer_unreadable").inc()
            logger.warning("index follow: %s; still serving index %s", problem, self.resources.bundle.index.version)
        return name

    async def _refuse(self, wanted: str, err: ReloadFailed) -> str:
        if await asyncio.to_thread(read_current, self.root) != wanted:
            return "moved"  # the failure may belong to the newer pointer: judge that one on the next poll
        previous = self._refused.get(wanted)
        delay = REFUSED_RETRY_S if previous is None else min(2 * previous.delay_s, REFUSED_RETRY_MAX_S)
        self._refused[wanted] = _Refusal(delay, time.monotonic() + delay)
        if previous is None:
            self.resources.metrics.index_follow.labels("refused").inc()
            logger.warning("index follow: refused index version %s named by %s (%s); trying it again in %.0fs, or "
                           "publish a good version or run `transresnet index rollback %s`", wanted,
                           self.root / "CURRENT", err, delay, self.root)
        else:
            logger.debug("index follow: version %s refused again; next try in %.0fs", wanted, delay)
        return "refused"


def index_follower(settings: ServiceSettings, resources: Resources) -> IndexFollower | None:
    """The follower the settings ask for (not started), or None; raises ValueError for a setting that
    cannot work, before anything slow is loaded."""
    if not follow_enabled(settings):
        return None
    assert settings.index_root is not None and settings.follow_index is not None
    return IndexFollower(resources, settings.index_root, settings.follow_index)
