"""The transresnet command: data, train, eval, index and serve subcommands.

This package is the top layer (entry points): it may import the core, ``transresnet.index`` and
``transresnet.service``; nothing imports it. Each subcommand module registers its parser with a
``register(subparsers)`` function and imports torch, faiss or the app only inside its handlers, so
``transresnet --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import metadata
from typing import Any

from transresnet.cli import data, evaluate, index, serve, train
from transresnet.runtime import apply_runtime_defaults

logger = logging.getLogger("transresnet")

COMMANDS = (data, train, evaluate, index, serve)
EXAMPLES = """examples:
  transresnet serve                                   the embedded demo on http://127.0.0.1:8000
  transresnet train --config configs/flickr8k.yaml --out runs/flickr8k
  transresnet index build --checkpoint runs/flickr8k/best --captions captions.csv --out indexes/flickr8k
  transresnet index query --checkpoint runs/flickr8k/best --index indexes/flickr8k --image photo.jpg \\
      --personality Sweet
  transresnet eval --checkpoint runs/flickr8k/best --data captions.csv --split val --out reports/val
  transresnet COMMAND --help                          every flag of a command
"""
QUIET_LOGGERS = ("httpx", "urllib3", "PIL", "matplotlib", "filelock", "faiss.loader", "huggingface_hub")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)



def _version() -> str:
    try:
        return metadata.version("transresnet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transresnet", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"transresnet {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def describe_error(err: BaseException) -> str:
    """One line that says what went wrong and, where the error knows it, what to fix."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        return "invalid options: " + "; ".join(map(_option_problem, err.errors()))
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}"
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0] if isinstance(err, RuntimeError) else " ".join(text.split())


def _option_problem(error: Any) -> str:
    """A pydantic error of an options model, named by its flag: '--recall-target: should be ...'."""
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return message
    return "--" + "-".join(str(part).replace("_", "-") for part in error["loc"]) + ": " + message


# Failures a user can fix: bad options or configs, missing or unreadable files, FAISS and torch refusing
# input (RuntimeError), an optional extra not installed (ImportError). Anything else keeps its traceback.
EXPECTED_ERRORS = (ValueError, OSError, RuntimeError, ImportError)


def main(argv: list[str] | None = None) -> int:
    apply_runtime_defaults()
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    except EXPECTED_ERRORS as err:
        if args.verbose:
            logger.exception("failed")
        else:
            logger.error("%s (run with -v for the traceback)", describe_error(err))
        return 2


if __name__ == "__main__":
    sys.exit(main())
