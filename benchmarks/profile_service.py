"""Where a caption request's time goes: `py-spy record` of `transresnet serve` under load.

Starts the server on a loopback port, drives it with closed-loop clients (the same load as
benchmarks/service_bench.py), samples every thread of the server with py-spy for the measured window,
and summarises the samples: the share of CPU samples per stage (JPEG decode, preprocessing, image encoder,
text encoder, beam search, FAISS search, HTTP and serialisation, asyncio), and the hottest functions by
self time. Writes the raw collapsed stacks (open them in speedscope or inferno) and a JSON summary.

    python benchmarks/profile_service.py --checkpoint runs/flickr8k_voices/best --index INDEX \
        --concurrency 8 --seconds 30 --out benchmarks/results/profile_service.json

Needs py-spy (`pip install py-spy`) and permission to ptrace the server (root in a container is enough).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from _common import ServeProcess, machine, setup_env  # the script folder is on sys.path

setup_env()

from service_bench import SERVER_FLAGS, add_server_arguments, load_bodies, run_level, server_flags  # noqa: E402

from transresnet.tables import format_table  # noqa: E402

logger = logging.getLogger("profile_service")
REPO = Path(__file__).resolve().parents[1]

# A sample belongs to the first stage whose marker appears in its stack, innermost frame first.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("image decode (PIL)", ("decode_image", "probe_image", "to_rgb", "PIL/")),
    ("preprocess (torchvision)", ("torchvision/", "images.py")),
    ("beam search", ("decoding.py", "generating.py")),
    ("text encoder", ("encode_captions", "onnx_text", "transformers/")),
    ("image encoder + query", ("encode_photo_queries", "encode_image", "encode_queries", "timm/")),
    ("FAISS search", ("faiss", "search_jobs", "index/search.py")),
    ("HTTP, parsing, JSON", ("uvicorn/", "h11", "starlette/", "fastapi/", "pydantic", "multipart", "json")),
    ("batching and asyncio", ("batching.py", "asyncio/", "concurrent/futures", "threading.py", "queue.py")),
)


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost last in collapsed stacks
        for stage, markers in STAGES:
            if any(marker in frame for marker in markers):
                return stage
    return "other"


def summarise(raw: Path, top: int = 15) -> dict[str, Any]:
    """Samples per stage and the hottest functions by self time, from py-spy's collapsed stacks."""
    stages: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")[1:]  # the first entry is the thread
        samples = int(count)
        total += samples
        stages[stage_of(frames)] += samples
        if frames:
            self_time[frames[-1]] += samples
    share = {name: round(100.0 * n / total, 1) for name, n in stages.most_common()} if total else {}
    hottest = [{"function": name, "pct": round(100.0 * n / total, 1)} for name, n in self_time.most_common(top)]
    return {"samples": total, "stage_pct": share, "hottest": hottest}


def py_spy() -> str | None:
    """py-spy beside this interpreter (a virtual environment's bin/) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def record(pid: int, seconds: float, rate: int, out: Path) -> subprocess.Popen:
    command = [py_spy() or "py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
               "--format", "raw", "--output", str(out), "--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--generator", type=Path, help="serve a caption generator too (for --mode generate/hybrid)")
    parser.add_argument("--mode", choices=["retrieve", "generate", "hybrid"], default="retrieve")
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared/data/flickr8k-1k/images")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--personality", action="append")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--beam-size", type=int)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0, help="profiled window")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    add_server_arguments(parser)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/profile_service.json")
    args = parser.parse_args(argv)
    args.personality = args.personality or ["none"]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    if py_spy() is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw = args.out.with_suffix(".collapsed.txt")
    bodies = load_bodies(args, args.mode)
    flags = server_flags(args)
    if args.generator:
        flags += ["--generator", str(args.generator)]
    server = ServeProcess(flags, args.out.with_suffix(".server.log"))
    try:
        server.start()
        asyncio.run(run_level(server.base_url, bodies, args.concurrency, 40))  # warm up
        # Load runs for a little longer than the profile, so every sample is taken under load.
        requests = 10_000
        load: dict[str, Any] = {}
        profiler = record(server.process.pid, args.seconds, args.rate, raw)

        def drive() -> None:
            load.update(asyncio.run(run_level(server.base_url, bodies, args.concurrency, requests,
                                              deadline_s=args.seconds + 2)))

        driver = threading.Thread(target=drive)
        driver.start()
        output, _ = profiler.communicate(timeout=args.seconds + 120)
        driver.join()
        if profiler.returncode != 0:
            raise SystemExit(f"py-spy failed ({profiler.returncode}): {output[-2000:]}")
    finally:
        server.stop()
    summary = summarise(raw)
    report = {"checkpoint": str(args.checkpoint), "index": str(args.index), "mode": args.mode,
              "server": {name: getattr(args, name) for name in SERVER_FLAGS},
              "generator": str(args.generator) if args.generator else None, "concurrency": args.concurrency,
              "seconds": args.seconds, "load": load, "machine": machine(), "raw_stacks": str(raw), **summary}
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{args.mode}, concurrency {args.concurrency}: {load.get('rps', 0):.1f} req/s, p50 "
          f"{load.get('p50_ms', 0):.1f} ms over {args.seconds:.0f}s; {summary['samples']} samples "
          "(every thread's active samples)")
    print(format_table(["stage", "% of samples"], [[k, f"{v:.1f}"] for k, v in summary["stage_pct"].items()],
                       numeric=True))
    print(format_table(["hottest function (self)", "%"], [[h["function"][:90], f"{h['pct']:.1f}"]
                                                           for h in summary["hottest"]], numeric=True))
    print(f"\nwritten {args.out} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
