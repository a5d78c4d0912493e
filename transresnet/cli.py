"""The ``transresnet`` command: data, train, eval, index and serve subcommands.

Each package contributes its subcommands through a ``register(subparsers)`` function in a light
module (no torch/faiss at import), so ``transresnet --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

logger = logging.getLogger("transresnet")

COMMAND_MODULES = (
    "transresnet.commands",
    "index.commands",
    "service.commands",
)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transresnet", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Idle OpenMP threads that spin steal the cores torch and FAISS need on small shared machines
    # (measured: index build 3x faster with PASSIVE). Must be set before torch or faiss load.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    except (ValueError, FileNotFoundError) as err:
        # User errors (bad config, missing file, mismatched index): the message says what to fix.
        if args.verbose:
            logger.exception("failed")
        else:
            logger.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
