"""Soak and abuse run of the caption service on loopback: load, leaks, overload, abandoned clients, hot swaps
under load and hostile inputs, with bounded counts and time. Prints one table and writes JSON.

Starts `transresnet serve` as a subprocess (the real uvicorn, h11 limits and timeouts) on a free loopback port,
samples its RSS from /proc, and drives it with httpx:

    python benchmarks/soak.py                       # the embedded demo model (built once into .cache/demo)
    python benchmarks/soak.py --checkpoint RUN/best --index INDEX_ROOT --quick

Phases (each a row): ``load`` c=32; ``leak`` RSS growth over --leak-requests at c=8 after a warm-up;
``overload`` c=256 (503s and how fast they come, p99 of the admitted requests; clients wait the
Retry-After seconds after a 503, as a polite client does); ``abandon`` clients that give
up after 20-200 ms (how many requests the server still completed after its client left); ``swap`` hot reloads
under c=32 load; ``big-uploads`` 32 concurrent ~9 MB photos (peak RSS); ``hostile`` bombs, wrong formats,
giant bodies and headers, odd trait names, slow clients. Kill -9 of `index build` and of training with resume
are covered by the index and training tests (tests/test_index_*.py, tests/test_train.py), not here.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import random
import re
import socket
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import REPO, RESULTS, ServeProcess, loadavg, machine, multipart_body, setup_env, write_json

setup_env()

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from transresnet.tables import format_table  # noqa: E402

logger = logging.getLogger("soak")
ADMIN_TOKEN = "soak-admin-" + uuid.uuid4().hex[:8]


# ------------------------------------------------------------------------------------------ inputs

def jpeg(size: tuple[int, int], seed: int, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(1, size[1] // 8), max(1, size[0] // 8), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def noise_jpeg(target_bytes: int, seed: int) -> bytes:
    """A noise photo of about ``target_bytes`` (noise does not compress: the size is the pixel count)."""
    side = int((target_bytes / 1.9) ** 0.5)
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def multipart(data: bytes, traits: list[str], k: int = 5, filename: str = "photo.jpg") -> tuple[bytes, str]:
    """A caption request whose image part claims no type (hostile inputs say what they are only in bytes)."""
    return multipart_body(data, traits, k, filename=filename, content_type="application/octet-stream")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    import struct

    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def hostile_inputs() -> list[tuple[str, bytes, list[str], set[int]]]:
    """(name, image bytes, traits, acceptable statuses)."""
    cases: list[tuple[str, bytes, list[str], set[int]]] = []
    photo = jpeg((320, 240), 1)
    buffer = io.BytesIO()
    Image.new("1", (6300, 6300)).save(buffer, "PNG")
    cases.append(("png 6300x6300 (131 KB)", buffer.getvalue(), ["none"], {413}))
    cases.append(("png header 100000x100000", png_header_only(100_000, 100_000), ["none"], {413}))
    text_bomb = io.BytesIO()
    Image.new("RGB", (32, 32)).save(text_bomb, "PNG")
    raw = text_bomb.getvalue()
    bomb = raw[:33] + b"".join(png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * 8_000_000))
                               for _ in range(4)) + raw[33:]
    cases.append(("png zTXt text bombs", bomb, ["none"], {200, 422}))
    frames = [Image.new("P", (64, 64), i % 256) for i in range(2000)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    cases.append(("gif 2000 frames", gif.getvalue(), ["none"], {200}))
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    cases.append(("tiff header 100000x100000", re.sub(rb"\x08\x00\x00\x00", b"\xa0\x86\x01\x00",
                                                         tiff.getvalue(), count=2), ["none"], {413, 422}))
    cases.append(("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', ["none"], {422}))
    cases.append(("heic-like ftyp", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64, ["none"], {422}))
    cases.append(("truncated jpeg", photo[: len(photo) // 2], ["none"], {200, 422}))
    cases.append(("zero bytes", b"", ["none"], {422}))
    cases.append(("NUL trait", photo, ["Swe\x00et"], {422}))
    cases.append(("RTL trait", photo, ["\u202eteewS"], {422}))
    cases.append(("17 traits", photo, ["Sweet"] * 17, {422}))
    cases.append(("trait of 10000 chars", photo, ["x" * 10_000], {400, 422}))
    return cases


# ------------------------------------------------------------------------------------------ server

class Server(ServeProcess):
    """`transresnet serve` in a subprocess (admin token set), with RSS sampled every 50 ms."""

    def __init__(self, checkpoint: Path | None, index: Path | None, log_path: Path, env: dict[str, str]) -> None:
        flags = ["--checkpoint", str(checkpoint), "--index", str(index)] if checkpoint is not None else []
        super().__init__(flags, log_path, env={"TRANSRESNET_ADMIN_TOKEN": ADMIN_TOKEN, **env}, cwd=REPO)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def rss(self) -> int:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_rss = max(self.peak_rss, self.rss())

    def reset_peak(self) -> None:
        self.peak_rss = self.rss()

    def start(self, timeout: float = 300.0) -> None:
        super().start(timeout)
        self._sampler.start()

    def metric(self, text: str, pattern: str) -> float:
        found = re.search(pattern + r" ([0-9.e+]+)", text)
        return float(found.group(1)) if found else 0.0

    def stop(self) -> None:
        self._stop.set()
        super().stop()


# ------------------------------------------------------------------------------------------ load

@dataclass
class Outcome:
    latencies_ok: list[float] = field(default_factory=list)
    latencies_503: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


def _ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values) * 1000.0, q)), 1) if values else None


async def closed_loop(base_url: str, bodies: list[tuple[bytes, str]], concurrency: int, requests: int,
                      timeout: float = 120.0) -> Outcome:
    outcome = Outcome()
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        async def worker() -> None:
            for i in counter:
                body, content_type = bodies[i % len(bodies)]
                start = time.perf_counter()
                try:
                    response = await client.post("/v1/captions", content=body, headers={"content-type": content_type})
                except httpx.HTTPError as err:
                    outcome.fail(type(err).__name__)
                    continue
                elapsed = time.perf_counter() - start
                if response.status_code == 200:
                    outcome.latencies_ok.append(elapsed)
                elif response.status_code == 503 and "retry-after" in response.headers:
                    outcome.latencies_503.append(elapsed)
                    await asyncio.sleep(float(response.headers["retry-after"]))  # a polite client
                else:
                    outcome.fail(str(response.status_code))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcome


def row(phase: str, concurrency: int, outcome: Outcome, server: Server, wall: float, note: str = "") -> dict[str, Any]:
    ok = len(outcome.latencies_ok)
    return {"phase": phase, "concurrency": concurrency, "requests": ok + len(outcome.latencies_503)
            + sum(outcome.failures.values()), "ok": ok, "503": len(outcome.latencies_503),
            "failures": sum(outcome.failures.values()), "failure_kinds": outcome.failures,
            "p50_ms": _ms(outcome.latencies_ok, 50), "p99_ms": _ms(outcome.latencies_ok, 99),
            "p99_503_ms": _ms(outcome.latencies_503, 99), "rps": round(ok / wall, 1) if wall else None,
            "peak_rss_mib": round(server.peak_rss / 2**20), "wall_s": round(wall, 1), "note": note}


def run_load(server: Server, phase: str, bodies: list[tuple[bytes, str]], concurrency: int, requests: int,
             note: str = "") -> dict[str, Any]:
    server.reset_peak()
    start = time.perf_counter()
    outcome = asyncio.run(closed_loop(server.base_url, bodies, concurrency, requests))
    result = row(phase, concurrency, outcome, server, time.perf_counter() - start, note)
    logger.info("%s: %s", phase, {k: v for k, v in result.items() if k != "failure_kinds"})
    return result


def run_overload(server: Server, bodies: list[tuple[bytes, str]], requests: int) -> dict[str, Any]:
    """c=256, plus a probe client on its own connection (a thread, outside the 256 clients' event loop) that
    measures how fast a refused request is answered."""
    probe: list[tuple[int, float]] = []
    stop = threading.Event()

    def prober() -> None:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            while not stop.wait(0.05):
                began = time.perf_counter()
                status = client.post("/v1/captions", content=bodies[0][0],
                                     headers={"content-type": bodies[0][1]}).status_code
                probe.append((status, time.perf_counter() - began))

    thread = threading.Thread(target=prober)
    thread.start()
    try:
        result = run_load(server, "overload", bodies, 256, requests)
    finally:
        stop.set()
        thread.join()
    refused = [seconds for status, seconds in probe if status == 503]
    result.update(probe_requests=len(probe), probe_503=len(refused), probe_p50_503_ms=_ms(refused, 50),
                  probe_p99_503_ms=_ms(refused, 99))
    result["note"] = (f"probe client: {len(refused)}/{len(probe)} refused, 503 p50 {_ms(refused, 50)} ms, "
                      f"p99 {_ms(refused, 99)} ms")
    return result


def run_leak(server: Server, bodies: list[tuple[bytes, str]], requests: int) -> dict[str, Any]:
    asyncio.run(closed_loop(server.base_url, bodies, 8, min(500, requests)))  # warm allocator and caches
    before = server.rss()
    result = run_load(server, "leak", bodies, 8, requests)
    growth = (server.rss() - before) / 2**20
    result["rss_growth_mib"] = round(growth, 1)
    result["note"] = f"RSS growth {growth:+.1f} MiB over {requests} requests"
    return result


async def abandoning_clients(base_url: str, body: tuple[bytes, str], clients: int) -> int:
    """Clients that give up after 20-200 ms; returns how many got an answer before giving up."""
    rng = random.Random(0)
    answered = 0

    async def one() -> None:
        nonlocal answered
        async with httpx.AsyncClient(base_url=base_url, timeout=rng.uniform(0.02, 0.2)) as client:
            try:
                await client.post("/v1/captions", content=body[0], headers={"content-type": body[1]})
                answered += 1
            except httpx.HTTPError:
                pass

    await asyncio.gather(*(one() for _ in range(clients)))
    return answered


def run_abandon(server: Server, bodies: list[tuple[bytes, str]], clients: int) -> dict[str, Any]:
    def completed() -> float:
        text = httpx.get(f"{server.base_url}/metrics").text
        return server.metric(text, r'transresnet_stage_seconds_count\{stage="total"\}')

    server.reset_peak()
    before = completed()
    start = time.perf_counter()
    answered = asyncio.run(abandoning_clients(server.base_url, bodies[0], clients))
    gone_at = completed()
    time.sleep(3.0)  # anything still in the pipeline would finish now
    after = completed()
    wall = time.perf_counter() - start
    processed, after_gone = int(after - before), int(after - gone_at)
    result = row("abandon", clients, Outcome(), server, wall,
                 f"{clients} clients gave up after 20-200 ms; {answered} answered in time, {processed} processed "
                 f"in all, {after_gone} completed after every client had gone")
    result.update(requests=clients, ok=answered, processed=processed, completed_after_gone=after_gone,
                  rps=None)
    logger.info("abandon: %s", result["note"])
    return result


def run_swaps(server: Server, bodies: list[tuple[bytes, str]], requests: int, swaps: int) -> dict[str, Any]:
    reloads: list[int] = []

    def reloader() -> None:
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            for _ in range(swaps):
                response = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                reloads.append(response.status_code)
                time.sleep(0.2)

    thread = threading.Thread(target=reloader)
    thread.start()
    result = run_load(server, "swap", bodies, 32, requests)
    thread.join()
    ok = sum(1 for s in reloads if s == 200)
    result["reloads"] = reloads
    result["note"] = f"{ok}/{len(reloads)} hot reloads succeeded under load"
    if ok != len(reloads):
        result["failures"] += len(reloads) - ok
    return result


def run_big_uploads(server: Server, count: int) -> dict[str, Any]:
    data = noise_jpeg(9 * 1024 * 1024, 7)
    body = multipart(data, ["none"])
    result = run_load(server, "big-uploads", [body], min(32, count), count,
                      f"{count} uploads of {len(data) / 2**20:.1f} MB at c={min(32, count)}")
    return result


def send_raw(port: int, payload: bytes, *, trickle_s: float = 0.0, timeout: float = 40.0) -> tuple[bytes, float]:
    """Send ``payload`` (a byte at a time when ``trickle_s``) and read until the server closes."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            if trickle_s:
                for byte in payload:
                    sock.sendall(bytes([byte]))
                    time.sleep(trickle_s)
            else:
                sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks), time.perf_counter() - start


def run_hostile(server: Server) -> dict[str, Any]:
    server.reset_peak()
    outcome = Outcome()
    details: list[dict[str, Any]] = []
    start = time.perf_counter()
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for name, data, traits, expected in hostile_inputs():
            body, content_type = multipart(data, traits)
            began = time.perf_counter()
            status = client.post("/v1/captions", content=body, headers={"content-type": content_type}).status_code
            details.append({"input": name, "status": status, "ms": round((time.perf_counter() - began) * 1000)})
            if status in expected:
                outcome.latencies_ok.append(time.perf_counter() - began)
            else:
                outcome.fail(f"{name}: {status}")
        for name, length in (("50 MB body", 50 * 2**20),):
            status = client.post("/v1/captions", content=b"\x00" * length,
                                 headers={"content-type": "multipart/form-data; boundary=x"}).status_code
            details.append({"input": name, "status": status})
            (outcome.latencies_ok.append(0.0) if status == 413 else outcome.fail(f"{name}: {status}"))
    raw_cases = [
        ("64 MiB header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 * 2**20) + b"\r\n\r\n", 0.0,
         b"431"),
        ("500 headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(500))
         + b"\r\n", 0.0, b"431"),
        ("header at 1 byte per 0.5 s", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60, 0.5, b""),
    ]
    for name, payload, trickle, expected_status in raw_cases:
        answer, seconds = send_raw(server.port, payload, trickle_s=trickle)
        healthz = time.perf_counter()
        healthy = httpx.get(f"{server.base_url}/healthz", timeout=10).status_code == 200
        health_ms = round((time.perf_counter() - healthz) * 1000)
        good = healthy and (answer[9:12] == expected_status if expected_status else seconds < 15)
        details.append({"input": name, "answer": answer[:12].decode(errors="replace"), "seconds": round(seconds, 2),
                        "healthz_ms": health_ms})
        (outcome.latencies_ok.append(seconds) if good else outcome.fail(name))
    result = row("hostile", 1, outcome, server, time.perf_counter() - start,
                 f"{len(details)} hostile inputs; each refused or served as expected unless counted as failure")
    result.update(details=details, p50_ms=None, p99_ms=None, rps=None)
    logger.info("hostile: %d failures %s", result["failures"], outcome.failures)
    return result


# ------------------------------------------------------------------------------------------ main

TABLE_HEADER = ("phase", "conc", "requests", "ok", "503", "failed", "p50 ms", "p99 ms", "503 p99 ms", "req/s",
                "peak RSS MiB", "note")


def table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> Any:
        return "-" if value is None else value

    return format_table(TABLE_HEADER, [[r["phase"], r["concurrency"], r["requests"], r["ok"], r["503"],
                                        r["failures"], cell(r["p50_ms"]), cell(r["p99_ms"]), cell(r["p99_503_ms"]),
                                        cell(r["rps"]), r["peak_rss_mib"], r["note"]] for r in rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint dir (default: the embedded demo)")
    parser.add_argument("--index", type=Path, help="index root (default: the embedded demo)")
    parser.add_argument("--load-requests", type=int, default=2000)
    parser.add_argument("--leak-requests", type=int, default=5000)
    parser.add_argument("--overload-requests", type=int, default=2000)
    parser.add_argument("--abandon-clients", type=int, default=1000)
    parser.add_argument("--swap-requests", type=int, default=1000)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--big-uploads", type=int, default=32)
    parser.add_argument("--no-hostile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small counts (the bounded form the tests run)")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra TRANSRESNET_* settings for the server")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) != (args.index is None):
        parser.error("give both --checkpoint and --index, or neither for the embedded demo")
    if args.quick:
        args.load_requests, args.leak_requests, args.overload_requests = 150, 200, 512
        args.abandon_clients, args.swap_requests, args.swaps, args.big_uploads = 64, 150, 2, 8
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(item.split("=", 1) for item in args.server_env)
    server = Server(args.checkpoint, args.index, args.out.with_suffix(".server.log"), env)
    began = time.perf_counter()
    try:
        server.start(timeout=900)
        bodies = [multipart(jpeg((640, 480), seed), ["Sweet", "none"][: 1 + seed % 2]) for seed in range(16)]
        rows = [run_load(server, "load", bodies, 32, args.load_requests)]
        rows.append(run_leak(server, bodies, args.leak_requests))
        rows.append(run_overload(server, bodies, args.overload_requests))
        rows.append(run_abandon(server, bodies, args.abandon_clients))
        rows.append(run_swaps(server, bodies, args.swap_requests, args.swaps))
        rows.append(run_big_uploads(server, args.big_uploads))
        if not args.no_hostile:
            rows.append(run_hostile(server))
    finally:
        server.stop()
    report = {"benchmark": "soak", "command": " ".join(["python", "benchmarks/soak.py", *(argv or sys.argv[1:])]),
              "checkpoint": str(args.checkpoint or "embedded demo"), "index": str(args.index or "embedded demo"),
              "server_env": env, "machine": machine(), "loadavg_end": loadavg(),
              "seconds": round(time.perf_counter() - began, 1), "rows": rows}
    path = write_json(args.out, "soak", report)
    print(table(rows))
    print(f"\nwritten {path}")
    return 0 if all(r["failures"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
