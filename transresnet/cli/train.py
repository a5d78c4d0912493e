"""``transresnet data synth`` and ``transresnet train`` (heavy imports happen in the handlers)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from transresnet.options import Device, choices

logger = logging.getLogger(__name__)


def _synth(args: argparse.Namespace) -> int:
    from transresnet.synth import generate_synthetic_dataset

    csv_path = generate_synthetic_dataset(Path(args.out), args.images, seed=args.seed, image_size=args.image_size)
    logger.info("wrote %s", csv_path)
    return 0


def _train(args: argparse.Namespace) -> int:
    from transresnet.config import load_config

    overrides = list(args.set) + ([f"train.device={args.device}"] if args.device else [])
    config = load_config(args.config, overrides)  # checked before torch loads: a typo answers at once

    import torch

    from transresnet.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(config, Path(args.out), resume=args.resume)
    logger.info("best checkpoint: %s", result.best_checkpoint)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = data_sub.add_parser("synth", help="generate the synthetic personality-caption dataset")
    synth.add_argument("--out", required=True, help="output folder (images/, captions.csv, val.json, test.json)")
    synth.add_argument("--images", type=int, default=2000, help="number of images to draw (default: 2000)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the drawing (default: 0)")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    synth.set_defaults(func=_synth)

    train = subparsers.add_parser("train", help="train a model from a YAML config")
    train.add_argument("--config", required=True, help="YAML setup, e.g. configs/synthetic.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    train.add_argument("--out", required=True, help="run folder: config.yaml, best/, last/, metrics.jsonl")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last")
    train.add_argument("--device", choices=choices(Device), help="shorthand for --set train.device=...")
    train.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    train.set_defaults(func=_train)
