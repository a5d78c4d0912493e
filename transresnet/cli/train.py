"""``transresnet train`` (heavy imports happen in the handlers; the ``data`` tools are in cli/data.py)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from transresnet.options import Device, choices

if TYPE_CHECKING:
    from transresnet.config import ExperimentConfig

logger = logging.getLogger(__name__)


def check_inputs(config: ExperimentConfig) -> None:
    """Every file the config names exists and every split it names is in its data: checked before torch
    loads, so a wrong path answers at once. Data that ``data.synthesize`` will draw is not checked."""
    from transresnet.data import load_dataset

    data, image = config.data, config.model.image
    drawn = data.synthesize is not None and data.train is not None and not Path(data.train).exists()
    drawn_folder = Path(data.train).parent.resolve() if drawn and data.train else None

    def will_exist(path: str) -> bool:
        return drawn_folder is not None and Path(path).resolve().parent == drawn_folder

    named = {"data.train": data.train, "data.val": data.val, "data.test": data.test,
             "model.image.weights": image.weights,
             "model.personality.traits_file": config.model.personality.traits_file,
             "train.pretrain.captions": config.train.pretrain.captions}
    for key, path in named.items():
        if path and not will_exist(path) and not Path(path).exists():
            raise FileNotFoundError(f"{key} names {path}, which does not exist (set it with --set {key}=PATH)")
    for key, path, split in (("data.train_split", data.train, data.train_split),
                             ("data.val_split", data.val or data.train, data.val_split)):
        if path and split and not will_exist(path):
            if not load_dataset(path, split=split, require_images=False).records:
                raise ValueError(f"{path} has no records of split {split!r} ({key}); check the split column")


def _train(args: argparse.Namespace) -> int:
    from transresnet.config import load_config

    overrides = list(args.set) + ([f"train.device={args.device}"] if args.device else [])
    config = load_config(args.config, overrides)  # checked before torch loads: a typo answers at once
    check_inputs(config)

    import torch

    from transresnet.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    if config.model.family != "retrieval":  # a caption generator (showtell, showatttell, updown)
        from transresnet.generation.train import train_generator

        train = train_generator
    result = train(config, Path(args.out), resume=args.resume)
    logger.info("best checkpoint: %s", result.best_checkpoint)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a model from a YAML config")
    train.add_argument("--config", required=True, help="YAML setup, e.g. configs/synthetic.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    train.add_argument("--out", required=True, help="run folder: config.yaml, best/, states/ and LAST, metrics.jsonl")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete state in OUT/states")
    train.add_argument("--device", choices=choices(Device), help="shorthand for --set train.device=...")
    train.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    train.set_defaults(func=_train)
