"""Vector search speed and recall: exact FAISS, numpy brute force and the approximate index types.

For each size, a clustered data set (a gaussian mixture in a 64-d latent space, projected to the model
dimension plus noise, unit-normalised: real caption embeddings have low intrinsic dimension and cluster
by topic) and unseen queries from the same mixture. Approximate indexes are built and tuned with the
product's own code (``index.faiss_index``: same nlist/PQ defaults, tuned to --recall-target recall@10 on
separate tuning queries), then measured on other queries: queries/s at batch 1 and batch 64, recall@1 and
recall@10 against exact search, index memory and build time.

    .venv/bin/python benchmarks/search_bench.py [--sizes 10000,100000,1000000] [--dim 500]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from _common import loadavg, machine, mixture, setup_env, table, timed, write_json  # noqa: E402 (the script folder is on sys.path)

setup_env()

import numpy as np  # noqa: E402

logger = logging.getLogger("search_bench")
K = 10
TYPES = ("numpy", "flat", "ivf", "hnsw", "ivfpq")
EXTRA_TYPES = ("ivfpq_refine",)  # IVF-PQ re-ranked with the exact vectors: more memory than flat


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated database sizes")
    p.add_argument("--dim", type=int, default=500, help="vector dimension (the model's hidden_dim)")
    p.add_argument("--types", default=",".join(TYPES),
                   help=f"comma-separated subset of {','.join(TYPES + EXTRA_TYPES)}")
    p.add_argument("--queries", type=int, default=1000, help="evaluation queries per size")
    p.add_argument("--tune-queries", type=int, default=500, help="separate queries used to tune nprobe/efSearch")
    p.add_argument("--recall-target", type=float, default=0.95)
    p.add_argument("--hnsw-max", type=int, default=100_000,
                   help="skip HNSW above this size (its CPU build is the slowest part: 5.5 min at 1M on 2 idle cores)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: the product's default)")
    p.add_argument("--seconds", type=float, default=1.5, help="minimum timing per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/results/search_bench.json)")
    return p.parse_args(argv)


# -------------------------------------------------------------------------------------------- data


# ------------------------------------------------------------------------------------------ timing


def qps(search: Callable[[np.ndarray], Any], queries: np.ndarray, batch: int, seconds: float) -> float:
    """Queries per second at a fixed batch size, cycling through ``queries`` for at least ``seconds``."""
    search(queries[:batch])  # warm-up
    done, elapsed, position = 0, 0.0, 0
    while elapsed < seconds or done < 3 * batch:
        if position + batch > len(queries):
            position = 0
        block = queries[position:position + batch]
        started = time.perf_counter()
        search(block)
        elapsed += time.perf_counter() - started
        done += len(block)
        position += batch
        if done >= 20 * len(queries):
            break
    return done / elapsed


def numpy_search(vectors: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    def search(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = queries @ vectors.T
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1)
        return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1)
    return search


def recall_1(found: np.ndarray, truth: np.ndarray) -> float:
    return float((found[:, 0] == truth[:, 0]).mean())


# -------------------------------------------------------------------------------------------- runs


def bench_size(n: int, args: argparse.Namespace, types: list[str]) -> list[dict[str, Any]]:
    from transresnet.index import faiss_index as fx

    started = time.perf_counter()
    vectors = mixture(n, args.dim, seed=args.seed)
    queries = mixture(args.queries + args.tune_queries, args.dim, seed=args.seed + 1)
    tune, evaluate = queries[: args.tune_queries], queries[args.tune_queries:]
    logger.info("n=%d: data in %.1fs", n, time.perf_counter() - started)
    _, truth = fx.exact_search(vectors, evaluate, K)
    _, tune_truth = fx.exact_search(vectors, tune, K)
    rows: list[dict[str, Any]] = []

    def measure(name: str, search: Callable[[np.ndarray], Any], *, memory: int, build_s: float,
                params: dict | None = None, note: str = "", exact: bool = False) -> None:
        # Exact methods are checked on 64 queries (their recall is 1 by construction; all 1000 at 1M
        # vectors would hold a 4 GB score matrix in numpy).
        checked = 64 if exact else len(evaluate)
        _, found = search(evaluate[:checked])
        found_truth = truth[:checked]
        row = {"n": n, "type": name, "params": params or {}, "build_s": round(build_s, 2), "memory_bytes": int(memory),
               "recall@1": recall_1(found, found_truth), "recall@10": fx.recall_at(found, found_truth, K),
               "qps_b1": qps(search, evaluate, 1, args.seconds), "qps_b64": qps(search, evaluate, 64, args.seconds),
               "note": note}
        rows.append(row)
        logger.info("n=%d %s: %s", n, name, {k: v for k, v in row.items() if k not in ("n", "type")})

    if "numpy" in types:
        measure("numpy (matmul+argpartition)", numpy_search(vectors), memory=vectors.nbytes, build_s=0.0, exact=True)
    for kind in (t for t in types if t != "numpy"):
        if kind == "hnsw" and n > args.hnsw_max:
            rows.append({"n": n, "type": kind, "note": f"skipped: n > --hnsw-max {args.hnsw_max}"})
            continue
        index, build_s, params, note = build_tuned(kind, vectors, tune, tune_truth, args)
        memory = fx.index_memory_bytes(fx.to_cpu(index))
        label = {"flat": "flat (FAISS IndexFlatIP)"}.get(kind, kind)
        measure(label, partial(faiss_search, index), memory=memory, build_s=build_s, params=params, note=note,
                exact=kind == "flat")
        if kind == "flat":  # what CaptionIndex.search runs: BLAS for < BLAS_THRESHOLD queries, else FAISS
            measure("flat (index.search: exact)", partial(product_search, index, fx.flat_vectors(index)),
                    memory=memory, build_s=build_s, params=params, note="small batches via BLAS", exact=True)
    return rows


def build_tuned(kind: str, vectors: np.ndarray, tune: np.ndarray, tune_truth: np.ndarray,
                args: argparse.Namespace) -> tuple[Any, float, dict[str, Any], str]:
    """Build with the product's defaults and tune to the recall target on the tuning queries."""
    from transresnet.index import faiss_index as fx

    requested = fx.IndexSpec(type=kind.removesuffix("_refine"), nlist=args.nlist, refine=kind.endswith("_refine"))
    spec = fx.resolve_spec(requested, len(vectors), vectors.shape[1])
    build_s, (index, _) = timed(partial(fx.build_faiss_index, vectors, spec, seed=args.seed))
    params: dict[str, Any] = {"factory": spec.factory(vectors.shape[1])}
    if kind == "flat":
        return index, build_s, params, ""
    tune_s, result = timed(partial(fx.tune_search, index, tune, tune_truth, k=K, target=args.recall_target))
    params.update(result.params)
    note = f"tuned in {tune_s:.1f}s" + ("" if result.reached else f"; target not reached ({result.recall:.3f})")
    return index, build_s, params, note


def faiss_search(index: Any, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return index.search(queries, K)


def product_search(index: Any, view: np.ndarray | None, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from transresnet.index import faiss_index as fx

    return fx.search(index, queries, K, flat_view=view)


def print_rows(rows: list[dict[str, Any]]) -> None:
    header = ["n", "index", "params", "build s", "memory MiB", "recall@1", "recall@10", "q/s b=1", "q/s b=64",
              "x exact b=1", "x exact b=64", "note"]
    exact = {r["n"]: r for r in rows if r["type"] == "flat (FAISS IndexFlatIP)"}
    out = []
    for r in rows:
        if "qps_b1" not in r:
            out.append([r["n"], r["type"], "", "", "", "", "", "", "", "", "", r["note"]])
            continue
        base = exact.get(r["n"])
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        ratios = [f"{r[key] / base[key]:.1f}" if base else "" for key in ("qps_b1", "qps_b64")]
        out.append([r["n"], r["type"], params, f"{r['build_s']:.1f}", f"{r['memory_bytes'] / 2**20:.0f}",
                    f"{r['recall@1']:.3f}", f"{r['recall@10']:.3f}", f"{r['qps_b1']:.0f}", f"{r['qps_b64']:.0f}",
                    *ratios, r["note"]])
    print(table(out, header))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import faiss

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = sorted(set(types) - set(TYPES + EXTRA_TYPES))
    if unknown:
        print(f"unknown --types {unknown}; choose from {','.join(TYPES + EXTRA_TYPES)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for n in sizes:
        rows += bench_size(n, args, types)
    total = time.perf_counter() - started
    print(f"\ndim {args.dim}, k={K}, {args.queries} evaluation queries (unseen draws from the data's mixture), "
          f"tuned to recall@10 >= {args.recall_target} on {args.tune_queries} other queries; "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, GPUs: {faiss.get_num_gpus()}; "
          f"total {total / 60:.1f} min")
    print_rows(rows)
    result = {"benchmark": "search", "dim": args.dim, "k": K, "sizes": sizes, "queries": args.queries,
              "tune_queries": args.tune_queries, "recall_target": args.recall_target, "faiss": faiss.__version__,
              "threads": faiss.omp_get_max_threads(), "gpus": faiss.get_num_gpus(), "machine": machine(),
              "loadavg_end": loadavg(), "total_seconds": round(total, 1), "rows": rows}
    print(f"wrote {write_json(args.out, 'search_bench', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
