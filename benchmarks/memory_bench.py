"""Memory of a served caption index: resident memory, load time and search latency by pool size and index
type, with the vectors read into memory or memory-mapped.

For each pool size (the 39,460 real Flickr8k captions; a synthetic pool of a million, the real captions
with numbered variants), each index type (flat, ivf = IVF-flat, ivfpq) and each load mode (vectors in
memory, or ``mmap`` as ``TRANSRESNET_INDEX_MMAP=1`` does), a fresh process loads the published version the
way the service does (``load_index``: sizes and sha256 checked, vectors checked finite) and reports:

- resident memory over the process's baseline after imports, split into anonymous memory (the heap: what
  cannot be paged out) and file-backed pages (mapped files: shared between processes, reclaimable);
- load time; search p50/p99 at batch 1 through ``CaptionIndex.search`` (ids and caption rows), k = 5;
- with ``--service``: the whole service's resident memory (``transresnet serve`` with the checkpoint and
  this index, after startup and after a few caption requests).

Vectors are a clustered gaussian mixture in the checkpoint's dimension: memory and latency do not depend on
what the vectors say, and encoding a million captions on two cores would take most of an hour.

    .venv/bin/python benchmarks/memory_bench.py --checkpoint runs/flickr8k_voices/best \\
        [--sizes 39460,1000000] [--types flat,ivf,ivfpq] [--service] [--work /tmp/memory_bench]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import SHARED, ServeProcess, machine, mixture, multipart_body, setup_env, table, write_json

setup_env()

logger = logging.getLogger("memory_bench")
CAPTIONS = SHARED / "data" / "flickr8k-captions" / "captions.csv"
IMAGES = SHARED / "data" / "flickr8k-1k" / "images"
TYPES = ("flat", "ivf", "ivfpq")
MODES = ("memory", "mmap")
K = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint the indexes are built for (required)")
    p.add_argument("--sizes", default="39460,1000000", help="comma-separated caption pool sizes")
    p.add_argument("--types", default=",".join(TYPES), help=f"comma-separated subset of {','.join(TYPES)}")
    p.add_argument("--queries", type=int, default=300, help="batch-1 searches timed per configuration")
    p.add_argument("--service", action="store_true", help="also measure the whole service's resident memory")
    p.add_argument("--work", type=Path, default=Path("/tmp/memory_bench"), help="where the indexes are built")
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/memory_bench.json)")
    p.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # internal: measure one version, print JSON
    p.add_argument("--mmap", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ memory


def memory_of(pid: int | str = "self") -> dict[str, float]:
    """Resident memory in MiB: total, anonymous and file-backed (/proc/PID/status)."""
    wanted = {"VmRSS": "rss_mib", "RssAnon": "anon_mib", "RssFile": "file_mib"}
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[wanted[key]] = round(int(value.split()[0]) / 1024, 1)
    return out


def grown(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: round(after[key] - before[key], 1) for key in after}


# -------------------------------------------------------------------------------------------- data


def caption_pool(size: int) -> tuple[list[str], list[str], list[str]]:
    """``size`` distinct captions (ids, captions, image names): the real captions, then numbered variants."""
    with open(CAPTIONS, encoding="utf-8", newline="") as handle:
        rows = [(row["image"], row["caption"].strip()) for row in csv.DictReader(handle) if row["caption"].strip()]
    ids, captions, images = [], [], []
    for i in range(size):
        image, caption = rows[i % len(rows)]
        ids.append(f"c{i}")
        captions.append(caption if i < len(rows) else f"{caption} (variant {i // len(rows)})")
        images.append(image)
    return ids, captions, images


def build(folder: Path, size: int, index_type: str, checkpoint_info: dict[str, Any]) -> tuple[Path, float]:
    """Publish one index version of ``size`` captions (reused when already built); returns (path, build seconds)."""
    from transresnet.index.build import write_version
    from transresnet.index.captions import CaptionTable
    from transresnet.index.options import BuildOptions
    from transresnet.index.store import read_current, read_manifest, versions_dir

    root = folder / f"{size}-{index_type}"
    current = read_current(root)
    if current:  # built by an earlier run: its manifest says how long the build took
        version = versions_dir(root) / current
        return version, read_manifest(version)["build"]["seconds"]["total_s"]
    ids, captions, images = caption_pool(size)
    table = CaptionTable(captions=captions, ids=ids, metadata={"image": images}, source=str(CAPTIONS),
                         format="csv", rows_read=size)
    vectors = mixture(size, checkpoint_info["embed_dim"], seed=0)
    started = time.perf_counter()
    published = write_version(root, vectors=vectors, table=table, checkpoint_info=checkpoint_info,
                              options=BuildOptions(index_type=index_type, tune_queries=500))
    return published.path, time.perf_counter() - started


# ------------------------------------------------------------------------------------------- probe


def probe(version: Path, mmap: bool, queries: int) -> dict[str, Any]:
    """In this (fresh) process: load ``version`` as the service does, then time batch-1 searches."""
    import faiss
    from transresnet.index.search import load_index

    faiss.omp_set_num_threads(1)  # the service's default search_threads
    baseline = memory_of()
    started = time.perf_counter()
    caption_index = load_index(version, mmap=mmap, use_gpu=False)
    load_s = time.perf_counter() - started
    loaded = memory_of()
    vectors = mixture(queries, caption_index.dim, seed=1)
    times = []
    for row in vectors:
        started = time.perf_counter()
        caption_index.search(row[None], K)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"load_s": round(load_s, 2), "loaded": grown(loaded, baseline), "searched": grown(memory_of(), baseline),
            "search_p50_ms": round(statistics.median(times), 2),
            "search_p99_ms": round(times[int(0.99 * (len(times) - 1))], 2), "baseline": baseline,
            "count": len(caption_index), "file_mib": round(sum(p.stat().st_size for p in version.iterdir()) / 2**20, 1),
            "search_params": caption_index.manifest["index"].get("search_params")}


def run_probe(version: Path, mmap: bool, queries: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--probe", str(version), "--queries", str(queries)]
    done = subprocess.run(command + (["--mmap"] if mmap else []), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"probe of {version} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def service_memory(checkpoint: Path, version: Path, mmap: bool, log: Path) -> dict[str, Any]:
    """The whole service's resident memory after startup and after a few caption requests."""
    import httpx

    server = ServeProcess(["--checkpoint", str(checkpoint), "--index", str(version)], log,
                          env={"TRANSRESNET_INDEX_MMAP": "1" if mmap else "0"})
    started = time.perf_counter()
    try:
        server.start()
        ready_s = time.perf_counter() - started
        ready = memory_of(server.process.pid)
        statuses: dict[str, int] = {}
        for photo in sorted(IMAGES.glob("*.jpg"))[:10]:
            body, content_type = multipart_body(photo.read_bytes(), ["none"], k=K)
            status = httpx.post(f"{server.base_url}/v1/captions", content=body,
                                headers={"content-type": content_type}, timeout=60).status_code
            statuses[str(status)] = statuses.get(str(status), 0) + 1  # a 503 (stage timeout) is a result too
        return {"ready_s": round(ready_s, 1), "ready": ready, "after_requests": memory_of(server.process.pid),
                "statuses": statuses}
    finally:
        server.stop()


# -------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.probe:
        print(json.dumps(probe(args.probe, args.mmap, args.queries)))
        return 0
    if args.checkpoint is None:
        print("--checkpoint is required (a trained checkpoint directory, e.g. runs/flickr8k_voices/best)")
        return 2
    if not CAPTIONS.is_file():
        print(f"{CAPTIONS} not found: this benchmark needs ../shared/data (see its README)")
        return 1
    from transresnet.index.build import checkpoint_info

    from transresnet.checkpoint import load_checkpoint

    info = checkpoint_info(load_checkpoint(args.checkpoint, device="cpu"))
    rows: list[dict[str, Any]] = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for index_type in args.types.split(","):
            version, build_s = build(args.work, size, index_type, info)
            for mode in MODES:
                result = {"size": size, "type": index_type, "mode": mode, "build_s": round(build_s, 1),
                          **run_probe(version, mode == "mmap", args.queries)}
                if args.service:
                    log = args.work / f"serve-{size}-{index_type}-{mode}.log"
                    result["service"] = service_memory(args.checkpoint, version, mode == "mmap", log)
                rows.append(result)
                print_row(result)
    print_table(rows)
    path = write_json(args.out, "memory_bench", {"machine": machine(), "checkpoint": str(args.checkpoint),
                                                 "rows": rows})
    print(f"wrote {path}")
    return 0


def print_row(row: dict[str, Any]) -> None:
    logger.warning("%s %s %s: %s", row["size"], row["type"], row["mode"], json.dumps(row))


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ["captions", "type", "vectors", "files MiB", "load s", "anon MiB", "file-backed MiB",
              "after search anon/file", "search p50 ms", "p99 ms", "service RSS MiB (ready / after requests)"]
    out = []
    for r in rows:
        service = r.get("service")
        served = (f"{service['ready']['rss_mib']:.0f} / {service['after_requests']['rss_mib']:.0f}"
                  + ("" if set(service["statuses"]) == {"200"} else f" (HTTP {service['statuses']})")
                  if service else "-")
        out.append([r["size"], r["type"], r["mode"], r["file_mib"], r["load_s"], r["loaded"]["anon_mib"],
                    r["loaded"]["file_mib"], f"{r['searched']['anon_mib']:.0f} / {r['searched']['file_mib']:.0f}",
                    r["search_p50_ms"], r["search_p99_ms"], served])
    print(table(out, header))


if __name__ == "__main__":
    sys.exit(main())
