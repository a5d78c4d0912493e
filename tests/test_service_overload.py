"""Overload and memory, through a real uvicorn server on 127.0.0.1 where the network matters: header limits
(431), slow and idle connections, bounded admission (503 + Retry-After at once), stage timeouts, abandoned
requests leaving the pipeline, decode memory and non-finite scores."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.helpers import free_port, image_bytes

JPEG = image_bytes("JPEG")


class Served:
    """The app under uvicorn with the service's own server options (h11 limits and timeouts), in a thread."""

    def __init__(self, settings, **update) -> None:
        import uvicorn
        from transresnet.service.main import create_app
        from transresnet.service.server import server_options

        self.settings = settings.model_copy(update={"port": free_port(), "log_level": "warning", **update})
        self.app = create_app(self.settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, **server_options(self.settings)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = f"http://127.0.0.1:{self.settings.port}"

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def ranker(self):
        return self.app.state.resources.ranker

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.settings.port), timeout=10)


def read_response(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def is_closed(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def multipart(data: bytes = JPEG, traits: tuple[str, ...] = ("Sweet",)) -> tuple[bytes, str]:
    boundary = "b0undary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n'
             "Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n"]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="personality"\r\n\r\n{t}\r\n'.encode()
              for t in traits]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def served(service_settings) -> Iterator[Served]:
    with Served(service_settings, max_header_bytes=16 * 1024, max_headers=50, header_timeout_s=1.0,
                keep_alive_s=1, read_timeout_s=1.0) as running:
        yield running


# ------------------------------------------------------------------------------------------ headers

def test_oversized_header_is_431(served):
    with served.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 * 1024))
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"exceed 16384 bytes" in answer


def test_a_complete_over_long_head_is_431_on_a_fresh_and_a_kept_alive_connection(served):
    """Many fields, each small, over the bound together; whole in one send (measured once the head is in),
    and as the second request of a kept-alive connection (the bound restarts with each request)."""
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"a" * 600) for i in range(40))  # 40 fields, about 24 KiB
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n"
    with served.connect() as sock:
        sock.sendall(big)
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 431 ") and b"exceed 16384 bytes" in answer, answer[:200]
    with served.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(big)
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 431 ") and b"exceed 16384 bytes" in answer, answer[:200]


def test_a_64_mib_header_is_cut_off_early_and_health_stays_fast(served):
    sent = 0
    chunk = b"a" * 65536
    with served.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            while sent < 64 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert sent < 8 * 1024 * 1024, sent  # refused after the first 16 KiB (plus socket buffers), not 64 MiB
    start = time.perf_counter()
    assert httpx.get(f"{served.base_url}/healthz").status_code == 200
    assert time.perf_counter() - start < 1.0


def test_too_many_headers_is_431(served):
    response = httpx.get(f"{served.base_url}/healthz", headers={f"x-h{i}": "v" for i in range(60)})
    assert response.status_code == 431 and response.json()["error"] == "headers_too_large"


def test_headers_within_limits_pass(served):
    response = httpx.get(f"{served.base_url}/healthz", headers={"x-ok": "a" * 8000})
    assert response.status_code == 200


# ------------------------------------------------------------------------------------------ slow clients

def test_headers_sent_a_byte_at_a_time_are_cut_off(served):
    with served.connect() as sock:
        start = time.monotonic()
        closed_after = None
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - start
                break
            if is_closed(sock, 0.2):
                closed_after = time.monotonic() - start
                break
    assert closed_after is not None and closed_after < 3.0, closed_after


def test_idle_keep_alive_connection_is_closed(served):
    with served.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert is_closed(sock, 5.0)
        assert time.monotonic() - start < 3.0


def test_slow_body_gets_408(served):
    body, content_type = multipart()
    with served.connect() as sock:
        sock.sendall(f"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        start = time.monotonic()
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"request_timeout" in answer and time.monotonic() - start < 3.0


# ------------------------------------------------------------------------------------------ backpressure

def hold_slots(served: Served, count: int) -> list[socket.socket]:
    """``count`` admitted caption requests whose bodies are still arriving (each holds a slot)."""
    body, content_type = multipart()
    socks = []
    for _ in range(count):
        sock = served.connect()
        sock.sendall(f"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:50])
        socks.append(sock)
    deadline = time.monotonic() + 5
    while served.ranker.admission.active < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.ranker.admission.active == count
    return socks


def test_over_the_in_flight_limit_503_at_once_with_retry_after(service_settings):
    with Served(service_settings, max_in_flight=2, read_timeout_s=5.0) as served:
        socks = hold_slots(served, 2)
        try:
            with httpx.Client(base_url=served.base_url) as client:
                start = time.perf_counter()
                response = client.post("/v1/captions", files={"image": ("p.jpg", JPEG, "image/jpeg")},
                                       data={"personality": "Sweet"})
                elapsed = time.perf_counter() - start
                assert response.status_code == 503, response.text
                assert response.json()["error"] == "overloaded"
                assert response.headers["retry-after"] == "1"
                assert elapsed < 0.5, elapsed
                assert client.get("/healthz").status_code == 200  # other endpoints are not limited
        finally:
            for sock in socks:
                sock.close()
        deadline = time.monotonic() + 5
        while served.ranker.admission.active and time.monotonic() < deadline:
            time.sleep(0.01)
        response = httpx.post(f"{served.base_url}/v1/captions", files={"image": ("p.jpg", JPEG, "image/jpeg")},
                              data={"personality": "Sweet"})
        assert response.status_code == 200, response.text


class Gate:
    """Wraps a batch function: calls block until released, and every batch's items are recorded."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.open = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def __call__(self, items):
        self.batches.append(len(items))
        self.entered.set()
        self.open.wait(30)
        return self.fn(items)


def test_abandoned_requests_leave_the_pipeline(service_settings):
    with Served(service_settings, max_batch=1) as served:
        gate = Gate(served.ranker.encoder.fn)
        served.ranker.encoder.fn = gate
        results: dict[str, int] = {}

        def first() -> None:
            response = httpx.post(f"{served.base_url}/v1/captions", timeout=30,
                                  files={"image": ("p.jpg", JPEG, "image/jpeg")}, data={"personality": "Sweet"})
            results["first"] = response.status_code

        keeper = threading.Thread(target=first)
        keeper.start()
        assert gate.entered.wait(10)
        for _ in range(5):  # these queue behind the blocked encode, then their clients give up
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{served.base_url}/v1/captions", timeout=0.3,
                           files={"image": ("p.jpg", JPEG, "image/jpeg")}, data={"personality": "Sweet"})
        deadline = time.monotonic() + 5
        while served.ranker.admission.active > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.ranker.admission.active == 1  # only the first is still in the pipeline
        gate.open.set()
        keeper.join(30)
        assert results["first"] == 200
        time.sleep(0.3)
        assert gate.batches == [1]  # the abandoned five were never encoded
        text = httpx.get(f"{served.base_url}/metrics").text
        assert 'route="/v1/captions",status="499"} 5.0' in text


BIG_JPEG = image_bytes("JPEG", size=(400, 300), seed=11)  # about 70 KB of noise


def test_refused_requests_never_break_a_keep_alive_client(service_settings):
    """Refusals from 16 threads sharing one keep-alive pool are all clean 503s. The server reads and drops a
    small refused body first: a socket closed with unread request bytes is reset by the kernel, and the
    client would see a transport error instead of the 503 (seen as rare ReadErrors in the soak's overload)."""
    with Served(service_settings, max_in_flight=1, read_timeout_s=5.0) as served:
        socks = hold_slots(served, 1)
        errors, statuses = [], []

        def post(client: httpx.Client) -> None:
            for _ in range(25):
                try:
                    response = client.post("/v1/captions", files={"image": ("p.jpg", BIG_JPEG, "image/jpeg")},
                                           data={"personality": "Sweet"})
                    statuses.append(response.status_code)
                except httpx.TransportError as err:
                    errors.append(type(err).__name__)

        try:
            with httpx.Client(base_url=served.base_url, timeout=10) as client:
                with ThreadPoolExecutor(16) as pool:
                    list(pool.map(post, [client] * 16))
        finally:
            for sock in socks:
                sock.close()
        assert errors == [] and set(statuses) == {503}


def test_stage_timeout_is_503(service_settings):
    with TestClient(__import__("transresnet.service.main", fromlist=["create_app"]).create_app(
            service_settings.model_copy(update={"stage_timeout_s": 0.3})), raise_server_exceptions=False) as client:
        ranker = client.app.state.resources.ranker
        gate = Gate(ranker.encoder.fn)
        ranker.encoder.fn = gate
        try:
            response = client.post("/v1/captions", files={"image": ("p.jpg", JPEG, "image/jpeg")},
                                   data={"personality": "Sweet"})
        finally:
            gate.open.set()
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "stage_timeout" and "encode" in response.json()["message"]
        assert response.headers["retry-after"] == "1"


# ------------------------------------------------------------------------------------------ batcher

def test_cancelled_submission_is_skipped_and_released():
    from transresnet.service.batching import MicroBatcher

    seen: list[list[str]] = []
    gate = threading.Event()

    def run(items):
        seen.append(list(items))
        gate.wait(10)
        return items

    batcher = MicroBatcher(run, name="t", max_batch=8, max_wait_s=0.0, expect_more=lambda: False)
    batcher.start()

    async def scenario() -> None:
        first = asyncio.ensure_future(batcher.submit("a"))
        while not seen:
            await asyncio.sleep(0.005)
        gone = asyncio.ensure_future(batcher.submit("b"))
        kept = asyncio.ensure_future(batcher.submit("c"))
        await asyncio.sleep(0.02)
        gone.cancel()
        await asyncio.sleep(0.02)
        gate.set()
        assert (await first)[0] == "a" and (await kept)[0] == "c"
        with pytest.raises(asyncio.CancelledError):
            await gone

    try:
        asyncio.run(scenario())
    finally:
        batcher.stop()
    assert seen == [["a"], ["c"]]


# ------------------------------------------------------------------------------------------ decode memory

def test_decode_budget_is_weighted_fifo_and_survives_cancellation():
    from transresnet.service.ranking import DecodeBudget

    async def scenario() -> None:
        budget = DecodeBudget(100)
        await budget.acquire(60)
        order: list[str] = []

        async def take(name: str, cost: int) -> None:
            await budget.acquire(cost)
            order.append(name)

        big = asyncio.ensure_future(take("big", 70))
        small = asyncio.ensure_future(take("small", 10))  # waits behind big: first come, first served
        cancelled = asyncio.ensure_future(take("cancelled", 30))
        await asyncio.sleep(0.01)
        assert order == [] and budget.free == 40
        cancelled.cancel()
        budget.release(60)
        await asyncio.gather(big, small)
        assert order == ["big", "small"] and budget.free == 20
        assert budget.clamp(10**12) == 100

    asyncio.run(scenario())


def test_large_png_is_decoded_at_the_size_the_model_needs():
    import io

    from transresnet.service.imaging import decode_image, probe_image

    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(buffer, "PNG")
    data = buffer.getvalue()
    image = decode_image(data, max_bytes=len(data), max_pixels=10**7, min_side=64)
    assert 128 <= min(image.size) < 256, image.size  # reduced right after load, never below 2 x min_side
    probe = probe_image(data, max_bytes=len(data), max_pixels=10**7, min_side=64)
    assert probe.decode_bytes == 3000 * 2000 * (3 + 3)


def test_jpeg_probe_counts_draft_scaled_pixels():
    from transresnet.service.imaging import probe_image

    data = image_bytes("JPEG", size=(2048, 1536))
    probe = probe_image(data, max_bytes=len(data), max_pixels=10**7, min_side=64)
    assert probe.decode_bytes == (2048 // 8) * (1536 // 8) * 6


def test_default_pixel_limit_refuses_the_6300_px_png():
    import io

    from transresnet.service.errors import ImageTooLarge
    from transresnet.service.imaging import probe_image
    from transresnet.service.settings import ServiceSettings

    settings = ServiceSettings(_env_file=None)
    assert settings.max_pixels == 4096 * 4096
    buffer = io.BytesIO()
    Image.new("1", (6300, 6300)).save(buffer, "PNG")  # 131 KB on disk, 40 M pixels
    with pytest.raises(ImageTooLarge, match="downscale"):
        probe_image(buffer.getvalue(), max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)


def test_upload_bytes_are_released_after_decode(service_client):
    import sys

    from transresnet.service.ranking import Upload

    resources = service_client.app.state.resources
    ranker, bundle = resources.ranker, resources.bundle
    data = bytes(bytearray(JPEG))  # a fresh object: only this frame and the Upload reference it
    baseline = sys.getrefcount(data)
    upload = Upload(data)
    assert sys.getrefcount(data) == baseline + 1
    gate = Gate(ranker.encoder.fn)
    ranker.encoder.fn = gate
    during_encode: list[int] = []

    async def run() -> None:
        work = asyncio.ensure_future(ranker.rank(bundle, upload, [1], 3))
        while not gate.entered.is_set():
            await asyncio.sleep(0.005)
        during_encode.append(sys.getrefcount(data))
        gate.open.set()
        await work

    try:
        asyncio.run(run())
    finally:
        ranker.encoder.fn = gate.fn
    assert during_encode == [baseline]  # nothing in the pipeline holds the upload while it encodes
    with pytest.raises(RuntimeError, match="already"):
        upload.take()


# ------------------------------------------------------------------------------------------ non-finite

def test_non_finite_scores_never_reach_the_response(service_settings):
    import dataclasses

    from transresnet.service.main import create_app

    with TestClient(create_app(service_settings), raise_server_exceptions=False) as client:
        ranker = client.app.state.resources.ranker
        search = ranker.searcher.fn

        def poisoned(jobs):
            out = search(jobs)
            return [[[dataclasses.replace(hits[0], score=float("nan")), *hits[1:]] for hits in lists]
                    for lists in out]

        ranker.searcher.fn = poisoned
        response = client.post("/v1/captions", files={"image": ("p.jpg", JPEG, "image/jpeg")},
                               data={"personality": "Sweet", "k": "3"})
        assert response.status_code == 200, response.text
        assert "null" not in response.text and "NaN" not in response.text
        scores = [c["score"] for c in response.json()["results"][0]["captions"]]
        assert len(scores) == 2 and np.isfinite(scores).all()


def test_header_timeout_does_not_cut_idle_keep_alive_short(service_settings):
    with Served(service_settings, header_timeout_s=0.5, keep_alive_s=3) as served, served.connect() as sock:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(1.2)  # idle longer than the header timeout, shorter than keep-alive
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
