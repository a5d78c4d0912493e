"""Replicas that follow an index root (TRANSRESNET_FOLLOW_INDEX): two real uvicorn servers on loopback ports
serving one INDEX_ROOT converge on each newly published version under load without failing a request, refuse
a corrupt version once (not on every poll) and keep serving the old one, then pick up the good one after it."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerThread, build_test_index, free_port, image_bytes, service_captions

FOLLOW_S = 0.1
DEADLINE_S = 60.0


def follow_settings(service_settings, root: Path, **extra):
    return service_settings.model_copy(update={"index_root": root, "follow_index": FOLLOW_S, **extra})


@contextmanager
def replicas(settings, count: int = 2) -> Iterator[list[ServerThread]]:
    from transresnet.service.main import create_app

    with ExitStack() as stack:
        yield [stack.enter_context(ServerThread(create_app(settings), free_port())) for _ in range(count)]


class Load:
    """A few client threads posting photos to the replicas in turn until stopped; counts every outcome."""

    def __init__(self, servers: list[ServerThread], threads: int = 4) -> None:
        self.servers = servers
        self.outcomes: Counter = Counter()
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(i,)) for i in range(threads)]

    def _send(self, worker: int) -> None:
        clients = [httpx.Client(base_url=s.base_url, timeout=60) for s in self.servers]
        data = image_bytes(seed=worker)
        try:
            turn = worker
            while not self._stop.is_set():
                turn += 1
                files = {"image": ("photo.jpg", data, "image/jpeg")}
                try:
                    response = clients[turn % len(clients)].post("/v1/captions", files=files,
                                                                  data={"personality": ["Sweet"], "k": "3"})
                except httpx.HTTPError as err:
                    self.outcomes[type(err).__name__] += 1
                    continue
                self.outcomes[response.status_code] += 1
                if response.status_code == 200:
                    self.versions.add(response.json()["index"]["version"])
        finally:
            for client in clients:
                client.close()

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def served_version(server: ServerThread) -> str:
    response = httpx.get(f"{server.base_url}/readyz", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["index"]["version"]


def metric(server: ServerThread, series: str) -> float:
    """The value of one Prometheus series (name and labels exactly as exported), 0 when absent."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_S:.0f}s: {what}")
        time.sleep(FOLLOW_S)


def wait_for_version(servers: list[ServerThread], version: str) -> None:
    wait_until(lambda: all(served_version(s) == version for s in servers), f"every replica serves {version}")


def publish_corrupt_copy(root: Path, good: Path, scratch: Path) -> str:
    """A copy of ``good`` with index.faiss cut in half, renamed into versions/ and named by CURRENT (the way a
    broken build or a bad copy to shared storage would publish it)."""
    from transresnet.index.store import INDEX_FILE, new_version_name, set_current, versions_dir

    name = new_version_name()
    copy = scratch / name
    shutil.copytree(good, copy)
    faiss_file = copy / INDEX_FILE
    faiss_file.write_bytes(faiss_file.read_bytes()[: faiss_file.stat().st_size // 2])
    copy.rename(versions_dir(root) / name)
    set_current(root, name)
    return name


@pytest.fixture()
def follow_root(tiny_checkpoint, tmp_path) -> tuple[Path, Path]:
    """A fresh index root with one published version (the session's service_index_root must not change)."""
    root = tmp_path / "index"
    return root, build_test_index(tiny_checkpoint, root)


def test_replicas_follow_a_new_version_under_load(service_settings, tiny_checkpoint, follow_root):
    root, first = follow_root
    with replicas(follow_settings(service_settings, root)) as servers, Load(servers) as load:
        assert [served_version(s) for s in servers] == [first.name] * 2
        wait_until(lambda: load.outcomes[200] >= 8, "the load is being served")
        second = build_test_index(tiny_checkpoint, root, service_captions() + ["A brand new caption."])
        wait_for_version(servers, second.name)
        served_before = load.outcomes[200]
        wait_until(lambda: load.outcomes[200] >= served_before + 8, "the new version serves the load")
        for server in servers:
            assert metric(server, 'transresnet_index_follow_total{outcome="reloaded"}') == 1
            assert metric(server, "transresnet_index_captions") == 41
    assert set(load.outcomes) == {200}, load.outcomes
    assert load.versions == {first.name, second.name}


def test_corrupt_version_is_refused_once_then_a_good_one_is_followed(service_settings, tiny_checkpoint,
                                                                     follow_root, tmp_path, caplog):
    root, first = follow_root
    caplog.set_level(logging.WARNING, logger="transresnet.service.follow")
    with replicas(follow_settings(service_settings, root)) as servers, Load(servers) as load:
        bad = publish_corrupt_copy(root, first, tmp_path)
        refused = 'transresnet_index_follow_total{outcome="refused"}'
        wait_until(lambda: all(metric(s, refused) == 1 for s in servers), "every replica refused the bad version")
        time.sleep(10 * FOLLOW_S)  # ten more polls: the bad version is not tried again
        for server in servers:
            assert served_version(server) == first.name
            assert metric(server, refused) == 1
            assert metric(server, 'transresnet_reloads_total{outcome="failed"}') == 1
        good = build_test_index(tiny_checkpoint, root, service_captions() + ["After the broken one."])
        wait_for_version(servers, good.name)
    assert set(load.outcomes) == {200}, load.outcomes
    assert bad not in load.versions and good.name in load.versions
    warnings = [r.getMessage() for r in caplog.records if "refused index version" in r.getMessage()]
    assert len(warnings) == 2 and all(bad in w and "truncated" in w for w in warnings), warnings


# ------------------------------------------------------------------------------------------- settings


def test_a_version_directory_cannot_be_followed(service_settings, follow_root):
    from fastapi.testclient import TestClient
    from transresnet.service.follow import follow_enabled
    from transresnet.service.main import create_app

    root, first = follow_root
    settings = follow_settings(service_settings, first)
    with pytest.raises(ValueError, match=r"needs an INDEX_ROOT .* one version directory") as err:
        follow_enabled(settings)
    assert str(root) in str(err.value)
    with pytest.raises(ValueError, match="TRANSRESNET_FOLLOW_INDEX"), TestClient(create_app(settings)):
        pass  # the app refuses to start


def test_following_is_off_for_the_demo_and_when_unset(service_settings, follow_root, caplog):
    from transresnet.service.follow import follow_enabled

    root, _ = follow_root
    assert follow_enabled(follow_settings(service_settings, root)) is True
    assert follow_enabled(service_settings.model_copy(update={"index_root": root})) is False
    with caplog.at_level(logging.WARNING, logger="transresnet.service.follow"):
        assert follow_enabled(follow_settings(service_settings, root, demo_dir=root.parent)) is False
    assert "embedded demo" in caplog.text


def test_follow_interval_must_be_positive(service_settings):
    from pydantic import ValidationError
    from transresnet.service.settings import ServiceSettings

    with pytest.raises(ValidationError, match="follow_index"):
        ServiceSettings(_env_file=None, follow_index=0)
    assert ServiceSettings(_env_file=None, follow_index="0.5").follow_index == 0.5


def test_poll_outcomes_with_a_missing_pointer(service_settings, tiny_checkpoint, follow_root):
    """One follower step at a time on real resources: a missing CURRENT is reported once, not per poll."""
    from transresnet.index.store import CURRENT, set_current
    from transresnet.service.follow import index_follower
    from transresnet.service.metrics import ServiceMetrics
    from transresnet.service.resources import Resources

    root, first = follow_root
    metrics = ServiceMetrics()

    async def steps() -> list[str]:
        resources = Resources(follow_settings(service_settings, root), metrics)
        follower = index_follower(resources.settings, resources)
        await resources.start()
        try:
            outcomes = [await follower.poll()]
            (root / CURRENT).unlink()
            outcomes += [await follower.poll(), await follower.poll()]
            set_current(root, first.name)
            outcomes.append(await follower.poll())
            second = build_test_index(tiny_checkpoint, root)
            outcomes += [await follower.poll(), await follower.poll()]
            assert resources.bundle.index.version == second.name
            return outcomes
        finally:
            await resources.close()

    assert asyncio.run(steps()) == ["unchanged", "pointer_unreadable", "pointer_unreadable", "unchanged",
                                    "reloaded", "unchanged"]
    assert metrics.registry.get_sample_value("transresnet_index_follow_total", {"outcome": "pointer_unreadable"}) == 1
    assert metrics.registry.get_sample_value("transresnet_index_follow_total", {"outcome": "reloaded"}) == 1


def test_a_start_up_fallback_is_refused_once_and_cleared_when_current_is_fixed(service_settings, follow_root,
                                                                             tmp_path):
    """CURRENT bad at start-up: the newest good version serves (fallback); following refuses the bad one once
    and, once CURRENT is rolled back to the served version, reloads it so /readyz stops reporting a fallback."""
    from transresnet.index.store import set_current
    from transresnet.service.follow import index_follower
    from transresnet.service.metrics import ServiceMetrics
    from transresnet.service.resources import Resources

    root, first = follow_root
    bad = publish_corrupt_copy(root, first, tmp_path)

    async def steps() -> list[str]:
        resources = Resources(follow_settings(service_settings, root), ServiceMetrics())
        follower = index_follower(resources.settings, resources)
        await resources.start()
        try:
            assert resources.bundle.index_fallback["wanted"] == bad
            outcomes = [await follower.poll(), await follower.poll()]
            set_current(root, first.name)
            outcomes += [await follower.poll(), await follower.poll()]
            assert resources.bundle.index.version == first.name and resources.bundle.index_fallback is None
            return outcomes
        finally:
            await resources.close()

    assert asyncio.run(steps()) == ["refused", "waiting", "reloaded", "unchanged"]
