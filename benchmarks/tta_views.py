"""Which test-time views would help: recall of checkpoints with their pooled features averaged over more views
than ``model.image.tta`` offers, beside the centre crop and the flip, mean over the checkpoints (seeds).

Views: the centre crop (the evaluator's own path, ``tta: none``), the flip (``tta: flip``), and ``--crops`` random
resized crops with flips of the kind training caches (``ImagePreprocessor``'s training transform), drawn with the
same seeds for every photo, so a service could make the same ones; ``--draws`` independent sets of seeds show
how much the choice of crops moves recall. A frozen backbone's crop features are computed once and shared by
every checkpoint with the same backbone weights (the seeds of one config).

    .venv/bin/python benchmarks/tta_views.py --checkpoints runs/A/best runs/B/best runs/C/best \\
        --data ../shared/data/flickr8k-1k/captions.csv --split val [--crops 8] [--draws 2] \\
        [--feature-cache DIR] [--threads 1] [--out JSON]
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

logger = logging.getLogger("tta_views")
KEYS = ("R@1", "R@5", "R@10")
BATCH = 25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", nargs="+", type=Path, required=True, help="the seeds' checkpoint directories")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--crops", type=int, default=8, help="random resized crops (with flips) per draw")
    p.add_argument("--draws", type=int, default=2, help="independent sets of crop seeds")
    p.add_argument("--feature-cache", type=Path, default=None, help="feature cache root (default: each config's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/tta_views.json)")
    return p.parse_args(argv)


def crop_seeds(draw: int, crops: int) -> range:
    """Draw 0 uses seeds 1..crops, draw 1 seeds 101..100 + crops, ..."""
    return range(100 * draw + 1, 100 * draw + 1 + crops)


@torch.inference_mode()
def crop_features(checkpoint: Any, paths: list[Path], seeds: range) -> np.ndarray:
    """Pooled features (N, len(seeds), F) of each photo's random resized crop and flip under each seed."""
    from transresnet.features import pooled_features
    from transresnet.images import ImagePreprocessor

    preprocessor = ImagePreprocessor(checkpoint.config.model.image)
    backbone = checkpoint.model.backbone.eval()
    views = []
    for seed in seeds:
        pixels = []
        for path in paths:
            with torch.random.fork_rng(devices=[]):  # the same draw for every photo
                torch.manual_seed(seed)
                pixels.append(preprocessor.load(path, augment=True))
        batches = [torch.stack(pixels[i:i + BATCH]) for i in range(0, len(pixels), BATCH)]
        views.append(torch.cat([pooled_features(backbone, batch) for batch in batches]).numpy())
    return np.stack(views, axis=1)


def recall(inputs: Any, features: np.ndarray, rows: list[int]) -> dict[str, float]:
    """Image->caption R@1/5/10 and caption->image R@1 of the photos' features through the checkpoint's head."""
    from transresnet.evaluate import exact_rows, query_vectors

    queries = query_vectors(inputs.checkpoint, np.ascontiguousarray(features[rows], dtype=np.float32),
                            [0] * len(rows), 256)
    i2c, c2i, _ = exact_rows(inputs.task, queries, inputs.texts)
    return {**{k: i2c.metrics[k] for k in KEYS}, "c2i R@1": c2i.metrics["R@1"]}


def measure_checkpoint(path: Path, args: argparse.Namespace, crops: dict[str, dict[int, np.ndarray]]
                       ) -> dict[str, dict[str, float]]:
    """Recall of one checkpoint with each set of views (crop features computed once per backbone)."""
    from transresnet.evaluate import _backbone_identity, image_features, prepare
    from transresnet.options import EvalOptions

    inputs = prepare(EvalOptions(checkpoint=path, data=args.data, split=args.split, protocol="pool", tta="none",
                                 feature_cache=args.feature_cache, device="cpu"))
    checkpoint = inputs.checkpoint
    photos = list(dict.fromkeys(inputs.task.query_images))
    row_of = {p: i for i, p in enumerate(photos)}
    rows = [row_of[p] for p in inputs.task.query_images]
    centre = image_features(checkpoint, photos, feature_cache=args.feature_cache, batch_size=64)
    checkpoint.config.model.image.tta = "flip"
    flip = image_features(checkpoint, photos, feature_cache=args.feature_cache, batch_size=64)
    draws = crops.setdefault(_backbone_identity(checkpoint), {})
    out = {"centre crop": recall(inputs, centre, rows), "flip": recall(inputs, flip, rows)}
    for draw in range(args.draws):
        if draw not in draws:
            draws[draw] = crop_features(checkpoint, photos, crop_seeds(draw, args.crops))
            logger.info("computed %d crops of %d photos (draw %d)", args.crops, len(photos), draw)
        views = draws[draw]
        out[f"{args.crops} crops, draw {draw}"] = recall(inputs, views.mean(axis=1), rows)
        out[f"centre + {args.crops} crops, draw {draw}"] = recall(
            inputs, (views.sum(axis=1) + centre) / (args.crops + 1), rows)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    crops: dict[str, dict[int, np.ndarray]] = {}
    per_seed = [measure_checkpoint(path, args, crops) for path in args.checkpoints]
    mean = {views: {k: float(np.mean([seed[views][k] for seed in per_seed])) for k in per_seed[0][views]}
            for views in per_seed[0]}
    print(table([[views, *(round(v, 1) for v in metrics.values())] for views, metrics in mean.items()],
                ["views averaged", *KEYS, "caption->image R@1"]))
    data = {"checkpoints": [str(p) for p in args.checkpoints], "data": str(args.data), "split": args.split,
            "crops": args.crops, "draws": args.draws, "mean": mean, "per_checkpoint": per_seed}
    print(f"wrote {write_json(args.out, 'tta_views', data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
