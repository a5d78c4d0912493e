"""Subcommands of the core package: ``data synth``, ``train`` and ``eval`` (heavy imports happen in handlers)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _synth(args: argparse.Namespace) -> int:
    from transresnet.synth import generate_synthetic_dataset

    csv_path = generate_synthetic_dataset(Path(args.out), args.images, seed=args.seed, image_size=args.image_size)
    logger.info("wrote %s", csv_path)
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from transresnet.config import load_config
    from transresnet.train import train

    overrides = list(args.set) + ([f"train.device={args.device}"] if args.device else [])
    config = load_config(args.config, overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(config, Path(args.out), resume=args.resume)
    logger.info("best checkpoint: %s", result.best_checkpoint)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from transresnet.evaluate import EvalOptions, format_text_table, run_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    options = EvalOptions(checkpoint=Path(args.checkpoint), data=Path(args.data), protocol=args.protocol,
                          split=args.split, image_dir=Path(args.image_dir) if args.image_dir else None,
                          out=Path(args.out), index=Path(args.index) if args.index else None,
                          index_type=args.index_type, traits=args.traits, feature_cache=args.feature_cache,
                          batch_size=args.batch_size, precision=args.precision, recall_target=args.recall_target,
                          device=args.device, seed=args.seed)
    report = run_eval(options)
    print(format_text_table(report))
    print(f"wrote {Path(args.out) / 'eval.json'}, eval.md and recall_at_k.png ({report['seconds']['total_s']:.1f}s)")
    return 0


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("eval", help="recall@k of a checkpoint on a test split (table, json, markdown, plot)",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("--checkpoint", required=True, help="checkpoint directory, e.g. runs/flickr8k/best")
    ev.add_argument("--data", required=True, help="CSV, Personality-Captions JSON or Karpathy dataset.json")
    ev.add_argument("--protocol", choices=("candidates", "candidates500", "pool"), default="pool",
                    help="candidates: each example's own 100 candidates (500 with 5 golds: candidates500); "
                         "pool: every caption of the split, both directions, exact and through an index")
    ev.add_argument("--split", default=None, help="split to keep (CSV, Karpathy); e.g. val or test")
    ev.add_argument("--image-dir", default=None, help="image folder when not the format's default")
    where = ev.add_mutually_exclusive_group()
    where.add_argument("--index", default=None, help="pool: a published INDEX_ROOT to measure against exact search")
    where.add_argument("--index-type", choices=("flat", "ivf", "hnsw", "ivfpq"), default="ivf",
                       help="pool without --index: the index type built over the split's captions")
    ev.add_argument("--traits", choices=("given", "shuffled", "none"), default="given",
                    help="personality per query: as given, shuffled across queries, or withheld")
    ev.add_argument("--out", required=True, help="output folder: eval.json, eval.md, recall_at_k.png")
    ev.add_argument("--feature-cache", default=None, help="feature cache root (default: the checkpoint config's)")
    ev.add_argument("--batch-size", type=int, default=256, help="queries and captions per encoder batch")
    ev.add_argument("--precision", choices=("auto", "float32", "bfloat16", "float16"), default="float32",
                    help="caption encoder precision")
    ev.add_argument("--recall-target", type=float, default=0.95,
                    help="recall@10 against exact search the approximate index is tuned to")
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ev.add_argument("--seed", type=int, default=0, help="shuffled traits and index training samples")
    ev.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    ev.set_defaults(func=_eval)


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = data_sub.add_parser("synth", help="generate the synthetic personality-caption dataset")
    synth.add_argument("--out", required=True, help="output folder (images/, captions.csv, val.json, test.json)")
    synth.add_argument("--images", type=int, default=2000, help="number of images to draw")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64)
    synth.set_defaults(func=_synth)

    train = subparsers.add_parser("train", help="train a model from a YAML config")
    train.add_argument("--config", required=True, help="YAML setup, e.g. configs/synthetic.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    train.add_argument("--out", required=True, help="run folder: config.yaml, best/, last/, metrics.jsonl")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="shorthand for --set train.device=...")
    train.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    train.set_defaults(func=_train)

    _register_eval(subparsers)
