"""Load-test the caption service over real HTTP: latency percentiles and throughput, batching on vs off.

First measures the request path's floor in this process: for each photo, the service's own stage functions
in a tight loop (header probe + decode, preprocess, image encode + query, search; one photo at a time, the
service's thread settings), median per stage. Then starts `transresnet serve` as a subprocess on a loopback
port (once with micro-batching, once without), sends the same JPEGs at several concurrency levels for a fixed
number of requests each, and prints a side-by-side table with the p50 at concurrency 1 as a ratio of the
floor; the full numbers go to a JSON file. With ``--generator``, a third server (batched, serving the
generator beside retrieval) is measured in each of ``--modes`` (retrieve, generate, hybrid, and the last two
with consensus re-ranking) side by side.

    python benchmarks/service_bench.py --checkpoint runs/flickr8k/best --index runs/flickr8k-index \
        --images ../shared/data/flickr8k-1k/images --requests 300 --out runs/bench/service_bench.json
    python benchmarks/service_bench.py ... --generator runs/flickr8k_updown/best --mode-requests 100
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import ServeProcess, multipart_body, setup_env  # the script folder is on sys.path

setup_env()  # the service's runtime defaults (OMP_WAIT_POLICY=PASSIVE...) for the in-process floor too

import httpx  # noqa: E402
import numpy as np  # noqa: E402

logger = logging.getLogger("service_bench")
REPO = Path(__file__).resolve().parents[1]


STAGES = ("decode", "encode_queue", "encode", "search_queue", "search", "generate_queue", "generate",
          "rescore_queue", "rescore", "consensus")
"""The per-stage timings a caption response carries (``timings.<stage>_ms``), summarised per level."""
SERVER_FLAGS = ("max_batch", "max_search_batch", "max_wait_ms", "threads", "image_precision")
"""The `transresnet serve` settings a benchmark passes through (see :func:`add_server_arguments`)."""


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The server settings under test, shared with benchmarks/profile_service.py (unset: the server's)."""
    parser.add_argument("--max-batch", type=int, help="server --max-batch (default: the server's)")
    parser.add_argument("--max-search-batch", type=int, help="server --max-search-batch (default: the server's)")
    parser.add_argument("--max-wait-ms", type=float, help="server --max-wait-ms (default: the server's)")
    parser.add_argument("--threads", type=int, help="server torch threads (default: the server's)")
    parser.add_argument("--image-precision", help="the image runtime of the floor and the server (default: the "
                                                  "server's, float32)")


def server_flags(args: argparse.Namespace) -> list[str]:
    """`transresnet serve` flags of the checkpoint, index and :data:`SERVER_FLAGS` under test."""
    flags = ["--checkpoint", str(args.checkpoint), "--index", str(args.index)]
    for name in SERVER_FLAGS:
        value = getattr(args, name)
        if value is not None:  # 0 is a setting too (--max-wait-ms 0: never wait for company)
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


def start_server(args: argparse.Namespace, batching: bool, generator: Path | None = None) -> ServeProcess:
    """`transresnet serve` of the checkpoint and index under test, batched or not, with a generator or not."""
    flags = server_flags(args)
    if generator is not None:
        flags += ["--generator", str(generator)]
    if not batching:
        flags.append("--no-batching")
    label = "generator" if generator is not None else "batched" if batching else "unbatched"
    return ServeProcess(flags, args.out.with_suffix(f".server-{label}.log"))


async def run_level(base_url: str, bodies: list[tuple[bytes, str]], concurrency: int,
                    requests: int, deadline_s: float | None = None) -> dict[str, Any]:
    """``requests`` requests from ``concurrency`` closed-loop workers (stopping early after ``deadline_s``
    seconds, when given); latency per request, wall-clock rate."""
    latencies: list[float] = []
    server_ms: list[float] = []
    stage_ms: dict[str, list[float]] = {}
    batch_sizes: list[int] = []
    decode_steps: list[int] = []
    errors: dict[str, int] = {}
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        async def worker() -> None:
            for i in counter:
                if deadline_s is not None and time.perf_counter() - began > deadline_s:
                    break
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
                for stage in STAGES:
                    if timings.get(f"{stage}_ms") is not None:
                        stage_ms.setdefault(stage, []).append(timings[f"{stage}_ms"])
                batch_sizes.append(timings.get("encode_batch_size") or timings.get("generate_batch_size") or 0)
                if "decode_steps" in timings:
                    decode_steps.append(timings["decode_steps"])

        began = time.perf_counter()
        client_cpu = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - began
        client_cpu = time.process_time() - client_cpu

    ms = np.asarray(latencies) * 1000.0
    return {
        "concurrency": concurrency, "requests": len(latencies), "errors": sum(errors.values()), "error_kinds": errors,
        "wall_s": round(wall, 3), "rps": round(len(server_ms) / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2), "mean_ms": round(float(ms.mean()), 2),
        "server_p50_ms": round(float(np.percentile(server_ms, 50)), 2) if server_ms else None,
        # The load generator shares the machine: the cores it used are not the server's.
        "client_cores": round(client_cpu / wall, 2),
        "server_stage_p50_ms": {stage: round(float(np.median(values)), 2) for stage, values in stage_ms.items()},
        "mean_encode_batch": round(float(np.mean(batch_sizes)), 2) if batch_sizes else None,
        "mean_decode_steps": round(float(np.mean(decode_steps)), 2) if decode_steps else None,
    }


def run_levels(base_url: str, bodies: list[tuple[bytes, str]], levels: list[int], requests: int,
               **labels: Any) -> list[dict[str, Any]]:
    """One :func:`run_level` per concurrency level, each result tagged with ``labels`` (and logged)."""
    results = []
    for concurrency in levels:
        result = {**asyncio.run(run_level(base_url, bodies, concurrency, requests)), **labels}
        logger.info("%s concurrency=%d: p50 %.1f ms, %.1f req/s, %d errors",
                    " ".join(f"{k}={v}" for k, v in labels.items()), concurrency, result["p50_ms"], result["rps"],
                    result["errors"])
        results.append(result)
    return results


def load_bodies(args: argparse.Namespace, mode: str = "retrieve") -> list[tuple[bytes, str]]:
    paths = sorted(Path(args.images).glob("*.jpg"))[: args.num_images]
    if not paths:
        raise SystemExit(f"no .jpg files in {args.images}")
    name, _, rerank = mode.partition("+")  # "hybrid+consensus": mode hybrid with consensus re-ranking
    fields = {"mode": name, **({"beam_size": str(args.beam_size)} if args.beam_size and name != "retrieve" else {}),
              **({"consensus": "true"} if rerank == "consensus" else {})}
    return [multipart_body(p.read_bytes(), args.personality, args.k, filename=p.name, fields=fields) for p in paths]


def bench_modes(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One batched server with the generator, each mode at each concurrency (``--mode-requests`` each)."""
    server = start_server(args, batching=True, generator=args.generator)
    results = []
    try:
        server.start()
        for mode in args.modes:
            bodies = load_bodies(args, mode)
            asyncio.run(run_level(server.base_url, bodies, 2, min(args.warmup, 10)))
            results += run_levels(server.base_url, bodies, args.concurrency, args.mode_requests, mode=mode)
        return results
    finally:
        server.stop()


def modes_table(results: list[dict[str, Any]]) -> str:
    head = (f"{'mode':>17} | {'conc':>4} | {'p50':>7} {'p95':>7} {'p99':>7} {'req/s':>7} {'err':>4} | "
            f"{'server p50':>10} {'steps':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['mode']:>17} | {r['concurrency']:>4} | {r['p50_ms']:>7.1f} {r['p95_ms']:>7.1f} "
                     f"{r['p99_ms']:>7.1f} {r['rps']:>7.1f} {r['errors']:>4} | {r['server_p50_ms'] or 0:>10.1f} "
                     f"{r['mean_decode_steps'] or 0:>5.1f}")
    return "\n".join(lines)


def bench_mode(args: argparse.Namespace, bodies: list[tuple[bytes, str]], batching: bool) -> list[dict[str, Any]]:
    server = start_server(args, batching)
    try:
        server.start()
        asyncio.run(run_level(server.base_url, bodies, 4, args.warmup))  # warm caches, allocator, JIT paths
        return run_levels(server.base_url, bodies, args.concurrency, args.requests, batching=batching)
    finally:
        server.stop()


def measure_floor(args: argparse.Namespace, paths: list[Path], repeats: int = 3) -> dict[str, float]:
    """Median milliseconds per stage of one request done directly with the service's stage functions."""
    import torch
    from transresnet.service.bundle import load_bundle
    from transresnet.service.imaging import decode_image, probe_image
    from transresnet.service.ranking import EncodeJob, SearchJob, encode_jobs, search_jobs, set_search_threads
    from transresnet.service.resources import configure_threads
    from transresnet.service.settings import ServiceSettings

    settings = ServiceSettings(checkpoint=args.checkpoint, index_root=args.index, cpu_threads=args.threads or None)
    configure_threads(settings)
    bundle = load_bundle(args.checkpoint, args.index, device="cpu", image_precision=args.image_precision or "float32")
    slots = tuple(bundle.checkpoint.traits.lookup(t) for t in args.personality)
    limits = {"max_bytes": settings.max_upload_bytes, "max_pixels": settings.max_pixels, "min_side": bundle.min_side}
    stages: dict[str, list[float]] = {"decode": [], "preprocess": [], "encode": [], "search": []}
    # As in the service, search runs in its own thread with its own FAISS thread count (OpenMP's is per thread).
    searcher = ThreadPoolExecutor(1, initializer=set_search_threads, initargs=(settings.search_threads,))
    with torch.inference_mode(), searcher:
        for round_ in range(repeats + 1):  # the first round warms caches and lazy initialisation
            for path in paths:
                data = path.read_bytes()
                t0 = time.perf_counter()
                probe_image(data, **limits)
                image = decode_image(data, **limits)
                t1 = time.perf_counter()
                pixels = bundle.preprocessor(image)
                t2 = time.perf_counter()
                (queries,) = encode_jobs([EncodeJob(bundle, pixels, slots)])
                t3 = time.perf_counter()
                searcher.submit(search_jobs, [SearchJob(bundle, queries, args.k)]).result()
                t4 = time.perf_counter()
                if round_:
                    for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                        stages[name].append(seconds * 1000)
    floor = {name: round(float(np.median(values)), 2) for name, values in stages.items()}
    floor["total"] = round(sum(floor.values()), 2)
    logger.info("floor per request (ms): %s", floor)
    return floor


def floor_table(floor: dict[str, float], batched: list[dict[str, Any]], unbatched: list[dict[str, Any]]) -> str:
    lines = ["request path floor (ms, median per stage, one process): "
             + ", ".join(f"{name} {ms:.1f}" for name, ms in floor.items())]
    for label, results in (("batching on", batched), ("batching off", unbatched)):
        single = next((r for r in results if r["concurrency"] == 1), None)
        if single:
            lines.append(f"{label}: p50 at concurrency 1 = {single['p50_ms']:.1f} ms = "
                         f"{single['p50_ms'] / floor['total']:.2f}x the floor")
    return "\n".join(lines)


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
    parser.add_argument("--floor-images", type=int, default=50, help="photos timed for the floor (3 rounds each)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--personality", action="append", help="repeatable (default: none)")
    parser.add_argument("--k", type=int, default=5)
    add_server_arguments(parser)
    parser.add_argument("--generator", type=Path, help="a caption-generator checkpoint: also measure --modes")
    parser.add_argument("--modes", nargs="+",
                        choices=["retrieve", "generate", "hybrid", "generate+consensus", "hybrid+consensus"],
                        default=["retrieve", "generate", "hybrid", "hybrid+consensus"],
                        help="modes measured with --generator (+consensus: with consensus re-ranking)")
    parser.add_argument("--mode-requests", type=int, default=100, help="requests per mode and concurrency level")
    parser.add_argument("--beam-size", type=int, help="beam size of generate/hybrid requests (default: the "
                                                      "generator's)")
    parser.add_argument("--skip-batching-comparison", action="store_true",
                        help="with --generator: only the modes, not the batched/unbatched retrieval comparison")
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench/service_bench.json")
    args = parser.parse_args(argv)
    args.personality = args.personality or ["none"]
    if args.skip_batching_comparison and args.generator is None:
        parser.error("--skip-batching-comparison needs --generator (there would be nothing to measure)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bodies = load_bodies(args)
    batched: list[dict[str, Any]] = []
    unbatched: list[dict[str, Any]] = []
    floor: dict[str, float] = {}
    if not args.skip_batching_comparison:
        floor = measure_floor(args, sorted(Path(args.images).glob("*.jpg"))[: min(args.num_images,
                                                                                  args.floor_images)])
        batched = bench_mode(args, bodies, batching=True)
        unbatched = bench_mode(args, bodies, batching=False)
    modes = bench_modes(args) if args.generator is not None else []
    report = {
        "checkpoint": str(args.checkpoint), "index": str(args.index), "images": len(bodies),
        "personality": args.personality, "k": args.k, "server": {name: getattr(args, name) for name in SERVER_FLAGS},
        "image_precision": args.image_precision or "float32",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "floor_ms": floor, "batching_on": batched, "batching_off": unbatched,
        "generator": str(args.generator) if args.generator else None, "beam_size": args.beam_size, "modes": modes,
    }
    args.out.write_text(json.dumps(report, indent=1))
    if batched:
        print(table(batched, unbatched))
        print(floor_table(floor, batched, unbatched))
    if modes:
        print(modes_table(modes))
    print(f"\nwritten {args.out}")
    return 0 if all(r["errors"] == 0 for r in batched + unbatched + modes) else 1


if __name__ == "__main__":
    sys.exit(main())
