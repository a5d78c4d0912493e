"""Unit tests of the service's parts: safe decoding, the micro-batcher, settings and the serve command."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from transresnet.service.batching import MicroBatcher
from transresnet.service.errors import ImageTooLarge, InvalidImage
from transresnet.service.imaging import decode_base64, decode_image
from transresnet.service.readiness import wait_until_ready

from tests.helpers import free_port, image_bytes

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 1_000_000}


# ------------------------------------------------------------------------------------------ imaging

def test_decode_roundtrip_formats():
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"):
        img = decode_image(image_bytes(fmt, size=(30, 20)), **LIMITS)
        assert img.mode == "RGB" and img.size == (30, 20)


def test_exif_rotation_applied():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20)).save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), **LIMITS).size == (20, 40)


def test_large_jpeg_decoded_at_reduced_scale_but_not_below_twice_target():
    data = image_bytes("JPEG", size=(1600, 1200))
    img = decode_image(data, max_bytes=10_000_000, max_pixels=10_000_000, min_side=100)
    assert min(img.size) >= 200 and img.size[0] < 1600


def test_pixel_limit_is_inclusive():
    data = image_bytes("PNG", size=(100, 100))
    decode_image(data, max_bytes=1_000_000, max_pixels=10_000)
    with pytest.raises(ImageTooLarge):
        decode_image(data, max_bytes=1_000_000, max_pixels=9_999)


def test_eps_and_other_unsafe_formats_refused():
    with pytest.raises(InvalidImage):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", **LIMITS)


def test_base64_variants():
    data = image_bytes()
    encoded = base64.b64encode(data).decode()
    assert decode_base64(encoded, 10**6) == data
    assert decode_base64("\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76)), 10**6) == data
    assert decode_base64("data:image/jpeg;base64," + encoded, 10**6) == data
    for bad in ("abc", "!!!!", "data:image/png;base64"):
        with pytest.raises(InvalidImage):
            decode_base64(bad, 10**6)
    with pytest.raises(ImageTooLarge):
        decode_base64(encoded, 100)


# ------------------------------------------------------------------------------------------ batching

def _run(coro):
    return asyncio.run(coro)


def test_batcher_batches_concurrent_items_and_keeps_order():
    seen: list[list[int]] = []
    threads: set[str] = set()

    def double(items: list[int]) -> list[int]:
        seen.append(list(items))
        threads.add(threading.current_thread().name)
        time.sleep(0.01)
        return [2 * i for i in items]

    batcher = MicroBatcher(double, name="t", max_batch=8, max_wait_s=0.05)
    batcher.start()

    async def main() -> list:
        return await asyncio.gather(*(batcher.submit(i) for i in range(20)))

    try:
        results = _run(main())
    finally:
        batcher.stop()
    assert [value for value, _ in results] == [2 * i for i in range(20)]
    assert max(len(b) for b in seen) == 8 and sum(len(b) for b in seen) == 20
    assert all(info.size == len(next(b for b in seen if i in b)) for i, (_, info) in enumerate(results))
    assert threads == {"batcher-t"}, "batches must run on the dedicated worker thread"


def test_batcher_of_one_never_batches():
    sizes: list[int] = []

    def identity(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return items

    batcher = MicroBatcher(identity, name="one", max_batch=1, max_wait_s=0.05)
    batcher.start()

    async def main() -> None:
        await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    try:
        _run(main())
    finally:
        batcher.stop()
    assert sizes == [1] * 10


def test_lone_request_is_not_delayed_when_nothing_else_is_coming():
    batcher = MicroBatcher(lambda items: items, name="lone", max_batch=8, max_wait_s=0.5,
                           expect_more=lambda: False)
    batcher.start()
    try:
        start = time.perf_counter()
        _run(batcher.submit(1))
        assert time.perf_counter() - start < 0.25
    finally:
        batcher.stop()


def test_batch_errors_reach_every_caller_and_worker_survives():
    def fail_on_three(items: list[int]) -> list[int]:
        if 3 in items:
            raise RuntimeError("boom")
        return items

    batcher = MicroBatcher(fail_on_three, name="err", max_batch=1, max_wait_s=0)
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _run(batcher.submit(3))
        assert _run(batcher.submit(4))[0] == 4
    finally:
        batcher.stop()
    assert not batcher.alive


def test_stopped_batcher_refuses_work():
    batcher = MicroBatcher(lambda items: items, name="stopped", max_batch=2, max_wait_s=0)
    batcher.start()
    batcher.stop()
    with pytest.raises(RuntimeError):
        _run(batcher.submit(1))


# ------------------------------------------------------------------------------------------ settings, CLI

def test_settings_from_environment_and_dotenv(monkeypatch, tmp_path):
    from transresnet.service.settings import ServiceSettings

    (tmp_path / ".env").write_text("TRANSRESNET_PORT=9001\nTRANSRESNET_MAX_BATCH=4\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRANSRESNET_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("TRANSRESNET_BATCHING", "false")
    settings = ServiceSettings()
    assert settings.port == 9001 and settings.max_batch == 4 and settings.effective_max_batch == 1
    assert settings.admin_token.get_secret_value() == "s3cret" and "s3cret" not in repr(settings)
    assert ServiceSettings(port=1234).port == 1234  # explicit values (CLI flags) win


def test_serve_flags_override_settings():
    import argparse

    from transresnet.cli.serve import _overrides, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--port", "9000", "--no-batching", "--checkpoint", "ck"])
    assert _overrides(args) == {"port": 9000, "batching": False, "checkpoint": Path("ck")}


def test_cli_import_is_light():
    code = ("import sys, transresnet.cli, transresnet.service.settings; "
            "heavy = [m for m in ('torch', 'faiss', 'transformers', 'fastapi', 'uvicorn') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_app_creation_loads_nothing(tmp_path):
    from transresnet.service.main import create_app
    from transresnet.service.settings import ServiceSettings

    app = create_app(ServiceSettings(_env_file=None, checkpoint=tmp_path / "nope", index_root=tmp_path / "nope"))
    assert app.state.resources is None  # the lifespan loads; building the app never does


def test_readiness_wait_reports_a_server_that_exited():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait(30)
    with pytest.raises(RuntimeError, match="exited with status 3"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}", process, timeout=10)


def test_readiness_wait_times_out_when_nothing_listens():
    with pytest.raises(RuntimeError, match="not ready after"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}", timeout=0.5, poll_seconds=0.1)


def test_search_threads_are_set_in_the_search_worker_not_the_caller(service_settings):
    """OpenMP keeps its thread count per thread and torch and FAISS share it: the search worker sets FAISS's
    count itself, and starting the service leaves the starting thread's torch threads alone."""
    import faiss
    import torch
    from transresnet.service.metrics import ServiceMetrics
    from transresnet.service.resources import Resources

    threads_before = torch.get_num_threads()
    seen: list[int] = []
    settings = service_settings.model_copy(update={"search_threads": 1})

    async def start_and_look() -> None:
        resources = Resources(settings, ServiceMetrics())
        await resources.start()
        try:
            worker = resources.ranker.searcher
            worker.fn = lambda jobs: [seen.append(faiss.omp_get_max_threads()) for _ in jobs]  # report, not search
            await worker.submit(object())
        finally:
            await resources.close()

    asyncio.run(start_and_look())
    assert seen == [1]
    assert torch.get_num_threads() == threads_before
