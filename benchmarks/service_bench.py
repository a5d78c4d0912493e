"""Load-test the caption service over real HTTP: latency percentiles and throughput, batching on vs off.

Starts `transresnet serve` as a subprocess on a loopback port (once with micro-batching, once without),
sends real JPEGs at several concurrency levels for a fixed number of requests each, and prints a side-by-side
table; the full numbers go to a JSON file.

    python benchmarks/service_bench.py --checkpoint runs/flickr8k/best --index runs/flickr8k-index \
        --images ../shared/data/flickr8k-1k/images --requests 300 --out runs/bench/service_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _common import ServeProcess, multipart_body  # the script folder is on sys.path

logger = logging.getLogger("service_bench")
REPO = Path(__file__).resolve().parents[1]


def start_server(args: argparse.Namespace, batching: bool) -> ServeProcess:
    """`transresnet serve` of the checkpoint and index under test, batched or not."""
    flags = ["--checkpoint", str(args.checkpoint), "--index", str(args.index)]
    for flag, value in (("--max-batch", args.max_batch), ("--max-search-batch", args.max_search_batch),
                        ("--max-wait-ms", args.max_wait_ms)):
        if value is not None:
            flags += [flag, str(value)]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    if not batching:
        flags.append("--no-batching")
    return ServeProcess(flags, args.out.with_suffix(f".server-{'batched' if batching else 'unbatched'}.log"))


async def run_level(base_url: str, bodies: list[tuple[bytes, str]], concurrency: int,
                    requests: int) -> dict[str, Any]:
    """``requests`` requests from ``concurrency`` closed-loop workers; latency per request, wall-clock rate."""
    latencies: list[float] = []
    server_ms: list[float] = []
    batch_sizes: list[int] = []
    errors: dict[str, int] = {}
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        async def worker() -> None:
            for i in counter:
                body, content_type = bodies[i % len(bodies)]
                start = time.perf_counter()
                try:
                    response = await client.post("/v1/captions", content=body,
                                                 headers={"content-type": content_type})
                except httpx.HTTPError as err:
                    errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                    continue
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
                    continue
                timings = response.json()["timings"]
                server_ms.append(timings["total_ms"])
                batch_sizes.append(timings["encode_batch_size"])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start

    ms = np.asarray(latencies) * 1000.0
    return {
        "concurrency": concurrency, "requests": requests, "errors": sum(errors.values()), "error_kinds": errors,
        "wall_s": round(wall, 3), "rps": round(len(server_ms) / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2), "mean_ms": round(float(ms.mean()), 2),
        "server_p50_ms": round(float(np.percentile(server_ms, 50)), 2) if server_ms else None,
        "mean_encode_batch": round(float(np.mean(batch_sizes)), 2) if batch_sizes else None,
    }


def load_bodies(args: argparse.Namespace) -> list[tuple[bytes, str]]:
    paths = sorted(Path(args.images).glob("*.jpg"))[: args.num_images]
    if not paths:
        raise SystemExit(f"no .jpg files in {args.images}")
    return [multipart_body(p.read_bytes(), args.personality, args.k, filename=p.name) for p in paths]


def bench_mode(args: argparse.Namespace, bodies: list[tuple[bytes, str]], batching: bool) -> list[dict[str, Any]]:
    server = start_server(args, batching)
    try:
        server.start()
        asyncio.run(run_level(server.base_url, bodies, 4, args.warmup))  # warm caches, allocator, JIT paths
        results = []
        for concurrency in args.concurrency:
            result = asyncio.run(run_level(server.base_url, bodies, concurrency, args.requests))
            result["batching"] = batching
            logger.info("batching=%s concurrency=%d: p50 %.1f ms, %.1f req/s, %d errors", batching, concurrency,
                        result["p50_ms"], result["rps"], result["errors"])
            results.append(result)
        return results
    finally:
        server.stop()


def table(batched: list[dict[str, Any]], unbatched: list[dict[str, Any]]) -> str:
    head = (f"{'conc':>4} | {'batching on: p50':>16} {'p95':>7} {'p99':>7} {'req/s':>7} {'err':>4} {'batch':>5} | "
            f"{'batching off: p50':>17} {'p95':>7} {'p99':>7} {'req/s':>7} {'err':>4} | {'speedup':>7}")
    lines = [head, "-" * len(head)]
    for on, off in zip(batched, unbatched, strict=True):
        lines.append(
            f"{on['concurrency']:>4} | {on['p50_ms']:>16.1f} {on['p95_ms']:>7.1f} {on['p99_ms']:>7.1f} "
            f"{on['rps']:>7.1f} {on['errors']:>4} {on['mean_encode_batch'] or 0:>5.1f} | {off['p50_ms']:>17.1f} "
            f"{off['p95_ms']:>7.1f} {off['p99_ms']:>7.1f} {off['rps']:>7.1f} {off['errors']:>4} | "
            f"{on['rps'] / off['rps'] if off['rps'] else float('nan'):>6.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint dir (e.g. runs/flickr8k/best)")
    parser.add_argument("--index", type=Path, required=True, help="index root built from the Flickr8k captions")
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared/data/flickr8k-1k/images")
    parser.add_argument("--num-images", type=int, default=200, help="distinct JPEGs cycled through")
    parser.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--personality", action="append", help="repeatable (default: none)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-batch", type=int, help="server --max-batch (default: the server's)")
    parser.add_argument("--max-search-batch", type=int, help="server --max-search-batch (default: the server's)")
    parser.add_argument("--max-wait-ms", type=float, help="server --max-wait-ms (default: the server's)")
    parser.add_argument("--threads", type=int, default=0, help="server torch/FAISS threads (0 = default)")
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench/service_bench.json")
    args = parser.parse_args(argv)
    args.personality = args.personality or ["none"]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bodies = load_bodies(args)
    batched = bench_mode(args, bodies, batching=True)
    unbatched = bench_mode(args, bodies, batching=False)
    report = {
        "checkpoint": str(args.checkpoint), "index": str(args.index), "images": len(bodies),
        "personality": args.personality, "k": args.k, "max_batch": args.max_batch,
        "max_search_batch": args.max_search_batch, "max_wait_ms": args.max_wait_ms,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "batching_on": batched, "batching_off": unbatched,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(table(batched, unbatched))
    print(f"\nwritten {args.out}")
    return 0 if all(r["errors"] == 0 for r in batched + unbatched) else 1


if __name__ == "__main__":
    sys.exit(main())
