"""Seed ensembling, measured: recall of several checkpoints' image->caption (and caption->image) similarity
matrices averaged, beside each checkpoint alone, with and without test-time augmentation.

Each checkpoint is evaluated exactly as ``transresnet eval --protocol pool`` does (:func:`transresnet.evaluate.
prepare`: the same feature cache, ``--tta`` override and caption encoding). Averaging the cosine matrices
q_s . t_s over seeds s equals one dot product of the seeds' vectors concatenated ([q_1 .. q_S] . [t_1 .. t_S],
up to the factor S), so the ensemble is ranked by the evaluator's own exact ranking (:func:`exact_rows`) over
concatenated vectors, ties and all; it could be served the same way, from one index S times as wide.

    .venv/bin/python benchmarks/seed_ensemble.py --checkpoints runs/A/best runs/B/best runs/C/best \\
        --data ../shared/data/flickr8k-1k/captions.csv --split val [--tta none flip] [--feature-cache DIR] \\
        [--threads 1] [--out JSON]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _common import setup_env, table, write_json

setup_env()

import torch  # noqa: E402

logger = logging.getLogger("seed_ensemble")
KEYS = ("R@1", "R@5", "R@10")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", nargs="+", type=Path, required=True, help="the seeds' checkpoint directories")
    p.add_argument("--data", type=Path, required=True, help="the evaluated split's CSV (or any eval --data)")
    p.add_argument("--split", default="val")
    p.add_argument("--tta", nargs="+", choices=("none", "flip"), default=["none", "flip"],
                   help="test-time views to measure (each overrides the checkpoints' model.image.tta)")
    p.add_argument("--feature-cache", type=Path, default=None, help="feature cache root (default: each config's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/seed_ensemble.json)")
    return p.parse_args(argv)


def seed_vectors(checkpoint: Path, args: argparse.Namespace, tta: str) -> Any:
    """One checkpoint's task, query and caption vectors, through the evaluator's own preparation."""
    from transresnet.evaluate import prepare
    from transresnet.options import EvalOptions

    options = EvalOptions(checkpoint=checkpoint, data=args.data, split=args.split, protocol="pool", tta=tta,
                          feature_cache=args.feature_cache, device="cpu")
    return prepare(options)


def metrics_of(rows: list[Any]) -> dict[str, dict[str, float]]:
    """The exact rows' R@1/5/10 by direction."""
    return {row.direction: {k: row.metrics[k] for k in KEYS} for row in rows}


def measure(args: argparse.Namespace, tta: str) -> dict[str, Any]:
    """Each seed alone and the seeds' averaged similarities, with test-time views ``tta``."""
    from transresnet.evaluate import exact_rows

    seeds = [seed_vectors(path, args, tta) for path in args.checkpoints]
    task = seeds[0].task
    for other in seeds[1:]:  # the same split in the same order, or the concatenation below means nothing
        if other.task.texts != task.texts or other.task.query_images != task.query_images:
            raise ValueError("the checkpoints ranked different queries or captions; evaluate the same --data")
    alone = [metrics_of(exact_rows(s.task, s.queries, s.texts)) for s in seeds]
    queries = np.concatenate([s.queries for s in seeds], axis=1)
    texts = np.concatenate([s.texts for s in seeds], axis=1)
    ensemble = metrics_of(exact_rows(task, queries, texts))
    mean = {d: {k: float(np.mean([a[d][k] for a in alone])) for k in KEYS} for d in ensemble}
    return {"tta": tta, "seeds": alone, "seed_mean": mean, "ensemble": ensemble}


def rows_of(result: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for what, metrics in (("mean of seeds", result["seed_mean"]), ("ensemble", result["ensemble"])):
        for direction in ("image->caption", "caption->image"):
            rows.append([result["tta"], what, direction, *(round(metrics[direction][k], 1) for k in KEYS)])
    return rows


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [measure(args, tta) for tta in args.tta]
    print(table([row for result in results for row in rows_of(result)],
                ["tta", "what", "direction", *KEYS]))
    data = {"checkpoints": [str(p) for p in args.checkpoints], "data": str(args.data), "split": args.split,
            "results": results}
    print(f"wrote {write_json(args.out, 'seed_ensemble', data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
