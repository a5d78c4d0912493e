"""``transresnet eval``: recall of a checkpoint on a split (flags from :class:`EvalOptions`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from transresnet.options import EvalOptions, add_arguments, from_namespace

logger = logging.getLogger(__name__)


def _eval(args: argparse.Namespace) -> int:
    options = from_namespace(EvalOptions, args)  # validated before torch loads
    for flag, path, kind in (("--checkpoint", options.checkpoint, "directory"), ("--data", options.data, "file"),
                             ("--index", options.index, "directory")):
        if path is not None and not (path.is_dir() if kind == "directory" else path.is_file()):
            raise FileNotFoundError(f"{flag} {path}: no such {kind}")

    import torch

    from transresnet.evaluate import format_text_table
    from transresnet.index.evaluate import run_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    if options.protocol == "generate":
        from transresnet.generation.evaluate import metric_table, run_generate_eval

        report = run_generate_eval(options)
        print(metric_table(report))
        print(f"wrote {Path(args.out) / 'eval.json'} and eval.md ({report['seconds']['total_s']:.1f}s)")
        return 0
    report = run_eval(options)
    print(format_text_table(report))
    print(f"wrote {Path(args.out) / 'eval.json'}, eval.md and recall_at_k.png ({report['seconds']['total_s']:.1f}s)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="recall@k of a checkpoint on a test split "
                                   "(table, JSON, markdown, plot)")
    add_arguments(parser, EvalOptions, required=("out",))
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    parser.set_defaults(func=_eval)
