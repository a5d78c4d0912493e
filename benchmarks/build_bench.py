"""Index build throughput: the local engine against the Ray engine with 1 and 2 encoder workers.

Each build is a real `transresnet index build` (``transresnet.index.build.build_index``) of a caption file into
a fresh INDEX_ROOT with ``--type auto``, timed by stage from the published manifest (read, encode, train,
add, tune, write). Two caption sets:

* ``real``: the Flickr8k captions (``../shared/data/flickr8k-captions/captions.csv``, 39,460 rows; skipped
  with a message where absent), or its first ``--limit`` rows;
* ``pool``: a synthetic pool of ``--pool-size`` captions (default 1M): the real captions repeated with varied
  suffixes, so every row is distinct and realistic in length.

``--index-pool-size N`` also times the index stage alone (train, add, tune, write, no encoding) at N vectors:
the real captions' encoded vectors tiled with small noise, built sequentially and with the parallel Ray add.

One local Ray instance (all cores) serves every Ray build. The checkpoint is runs/flickr8k_voices/best (or
``--checkpoint``); where none exists, a tiny random one is built the way the tests do (and the JSON says so).

    .venv/bin/python benchmarks/build_bench.py [--limit 6000] [--pool-size 1000000] [--engines local,ray:1,ray:2]
        [--sets real,pool] [--index-pool-size 300000]
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, SHARED, loadavg, machine, setup_env, table, write_json  # noqa: E402 (script folder on sys.path)

setup_env()

import numpy as np  # noqa: E402

logger = logging.getLogger("build_bench")
DEFAULT_CAPTIONS = SHARED / "data" / "flickr8k-captions" / "captions.csv"
DEFAULT_CHECKPOINT = REPO / "runs" / "flickr8k_voices" / "best"
SUFFIXES = ("", " at sunset", " in the rain", " on a sunny day", " near the water", " in the city", " at night",
            " in winter", " after lunch", " seen from afar")
STAGES = ("read_s", "encode_s", "train_s", "add_s", "tune_s", "write_s", "total_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS, help="the real caption file")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"retrieval checkpoint (default: {DEFAULT_CHECKPOINT.relative_to(REPO)} when present)")
    p.add_argument("--limit", type=int, default=None, help="real set: only the first N rows")
    p.add_argument("--pool-size", type=int, default=1_000_000, help="synthetic pool size (0 = skip the pool)")
    p.add_argument("--index-pool-size", type=int, default=0,
                   help="also time the index stage alone at this many vectors (0 = skip)")
    p.add_argument("--read-pool-size", type=int, default=0,
                   help="also time the read stage alone (parse + dedupe) of a pool this large, local and Ray, "
                        "as one file and as 4 shards (0 = skip)")
    p.add_argument("--engines", default="local,ray:1,ray:2", help="comma list of local and ray:WORKERS")
    p.add_argument("--sets", default="real,pool", help="comma list of the caption sets to build: real, pool")
    p.add_argument("--precision", default="float32", help="encoder precision of every build")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/build_bench.json)")
    return p.parse_args(argv)


def load_bench_checkpoint(path: Path | None, scratch: Path) -> tuple[Any, str]:
    """The real trained checkpoint when there is one, else the tests' tiny random one (labelled)."""
    from transresnet.checkpoint import load_checkpoint

    path = path or (DEFAULT_CHECKPOINT if (DEFAULT_CHECKPOINT / "config.yaml").is_file() else None)
    if path is not None:
        return load_checkpoint(path), str(path)
    import torch

    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tests.helpers import TINY_TRAITS, tiny_tree
    from transresnet.checkpoint import save_checkpoint
    from transresnet.config import build_config
    from transresnet.encoders import resolve_text_model
    from transresnet.model import create_model
    from transresnet.traits import TraitVocab

    logger.warning("no trained checkpoint under runs/: benchmarking the tests' tiny random model")
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(scratch / "bert")
    tokenizer.save_pretrained(scratch / "bert")
    config = build_config(tiny_tree(scratch / "bert"))
    saved = save_checkpoint(create_model(config.model, TraitVocab(TINY_TRAITS)), config, scratch / "tiny")
    return load_checkpoint(saved), "tiny random (tests' tiny_checkpoint recipe)"


def real_captions(path: Path, limit: int | None) -> list[str]:
    """The real rows as the index reads them (duplicates included: dedupe is part of the build)."""
    from transresnet.index.captions import read_rows

    captions = [str(row["caption"]) for row in read_rows(path)]
    return captions[:limit] if limit else captions


def write_csv(path: Path, captions: list[str]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["caption"])
        writer.writerows([c] for c in captions)
    return path


def synthetic_pool(real: list[str], size: int) -> list[str]:
    """``size`` distinct captions: the real ones with each suffix, then numbered takes of those."""
    pool: list[str] = []
    take = 0
    while len(pool) < size:
        for suffix in SUFFIXES:
            tail = suffix if take == 0 else f"{suffix}, take {take}"
            pool.extend(f"{caption.strip().rstrip('.')}{tail}." for caption in real)
            if len(pool) >= size:
                break
        take += 1
    return pool[:size]


def engine_options(engine: str, args: argparse.Namespace):
    from transresnet.index.options import BuildOptions

    common = {"index_type": "auto", "precision": args.precision, "batch_size": args.batch_size, "keep": 1}
    if engine == "local":
        return BuildOptions(**common)
    name, _, workers = engine.partition(":")
    if name != "ray" or not workers.isdigit():
        raise SystemExit(f"--engines: {engine!r} is neither 'local' nor 'ray:WORKERS'")
    return BuildOptions(**common, engine="ray", workers=int(workers), cpus_per_worker=1)


def run_build(checkpoint: Any, source: Path, engine: str, args: argparse.Namespace, scratch: Path) -> dict:
    from transresnet.index.build import build_index

    root = Path(tempfile.mkdtemp(prefix="index-", dir=scratch))
    started = time.perf_counter()
    published = build_index(checkpoint, source, root, engine_options(engine, args), progress=False)
    wall = time.perf_counter() - started
    manifest = published.manifest
    seconds, encoding = manifest["build"]["seconds"], manifest["encoding"]
    count = manifest["count"]
    row = {"engine": engine, "captions": count, "index": manifest["index"]["factory"], "wall_s": round(wall, 2),
           "captions_per_s": round(count / max(seconds["encode_s"], 1e-9), 1),
           "end_to_end_per_s": round(count / max(wall, 1e-9), 1),
           "per_worker_busy_per_s": encoding.get("captions_per_worker_second"),
           "precision": encoding["precision"], "loadavg": loadavg(),
           **{stage: round(seconds.get(stage, 0.0), 2) for stage in STAGES}}
    logger.info("%s", row)
    return row


def index_stage(vectors: np.ndarray, size: int, ray: Any, scratch: Path) -> list[dict]:
    """Train / add / tune / write at ``size`` vectors (tiled from real ones, with noise), no encoding."""
    from transresnet.index import store
    from transresnet.index.build import write_version
    from transresnet.index.captions import CaptionTable
    from transresnet.index.distributed import parallel_builder
    from transresnet.index.options import BuildOptions

    rng = np.random.default_rng(0)
    tiled = np.resize(vectors, (size, vectors.shape[1]))
    tiled += rng.standard_normal(tiled.shape, dtype=np.float32) * 0.02
    tiled /= np.linalg.norm(tiled, axis=1, keepdims=True)
    captions = CaptionTable(captions=[f"vector {i}" for i in range(size)], ids=[str(i) for i in range(size)])
    rows = []
    for label, builder in (("sequential add", None), ("parallel add, 2 Ray tasks", parallel_builder(ray, 2))):
        root = Path(tempfile.mkdtemp(prefix="index-stage-", dir=scratch))
        started = time.perf_counter()
        published = write_version(root, vectors=tiled, table=captions, checkpoint_info={"scoring": "cosine"},
                                  options=BuildOptions(index_type="auto", keep=1), builder=builder)
        seconds = published.manifest["build"]["seconds"]
        rows.append({"stage": label, "vectors": size, "index": published.manifest["index"]["factory"],
                     "memory_gib": round(published.manifest["index"]["memory_bytes"] / 2**30, 2),
                     "wall_s": round(time.perf_counter() - started, 2),
                     **{s: round(seconds.get(s, 0.0), 2) for s in ("train_s", "add_s", "tune_s", "write_s")}})
        logger.info("%s", rows[-1])
        store.prune(root, 1)
    return rows


def read_stage(real: list[str], size: int, ray: Any, scratch: Path) -> list[dict]:
    """Parse and dedupe ``size`` pool captions, local and on Ray, as one file and as 4 shard files."""
    from transresnet.index.captions import read_captions
    from transresnet.index.distributed import read_table_ray

    pool = synthetic_pool(real, size)
    one = write_csv(scratch / "read-pool.csv", pool)
    shards = scratch / "read-shards"
    shards.mkdir()
    quarter = -(-size // 4)
    for i in range(4):
        write_csv(shards / f"part-{i}.csv", pool[i * quarter:(i + 1) * quarter])
    rows = []
    for label, source in (("1 file", one), ("4 shards", shards)):
        for engine, read in (("local", read_captions), ("ray", lambda s: read_table_ray(ray, s))):
            started = time.perf_counter()
            kept = len(read(source))
            seconds = time.perf_counter() - started
            rows.append({"source": label, "engine": engine, "rows": size, "kept": kept, "read_s": round(seconds, 2),
                         "rows_per_s": round(size / seconds)})
            logger.info("%s", rows[-1])
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not args.captions.is_file():
        print(f"skipped: {args.captions} is absent (the real captions live in ../shared/data; see its README)")
        return 0
    from transresnet.index.distributed import require_ray

    ray = require_ray()
    scratch = Path(tempfile.mkdtemp(prefix="build-bench-"))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    checkpoint, checkpoint_label = load_bench_checkpoint(args.checkpoint, scratch)
    real = real_captions(args.captions, args.limit)
    chosen = args.sets.split(",")
    sets = {"real": write_csv(scratch / "real.csv", real)} if "real" in chosen else {}
    if args.pool_size and "pool" in chosen:
        sets["pool"] = write_csv(scratch / "pool.csv", synthetic_pool(real, args.pool_size))
    results: dict[str, Any] = {"machine": machine(), "checkpoint": checkpoint_label, "args": vars(args) | {
        "captions": str(args.captions), "checkpoint": str(args.checkpoint), "out": str(args.out)}, "builds": []}
    for name, source in sets.items():
        for engine in args.engines.split(","):
            results["builds"].append({"set": name, **run_build(checkpoint, source, engine, args, scratch)})
    if args.index_pool_size:
        from transresnet.encode import encode_captions

        sample = encode_captions(checkpoint.model, real[:2000], precision=args.precision, progress=False)
        results["index_stage"] = index_stage(sample, args.index_pool_size, ray, scratch)
    if args.read_pool_size:
        results["read_stage"] = read_stage(real, args.read_pool_size, ray, scratch)
    ray.shutdown()
    shutil.rmtree(scratch, ignore_errors=True)
    header = ["set", "engine", "captions", "index", "captions_per_s", "per_worker_busy_per_s", "end_to_end_per_s",
              *STAGES]
    print(table([[b[h] for h in header] for b in results["builds"]], header))
    for part in ("index_stage", "read_stage"):
        if results.get(part):
            part_header = list(results[part][0])
            print(table([[r[h] for h in part_header] for r in results[part]], part_header))
    print(f"wrote {write_json(args.out, 'build_bench', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
