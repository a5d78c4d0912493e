"""`transresnet index build | add | remove | info | query | verify | rollback`. Light at import: torch and faiss
load inside the handlers."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from transresnet.index.options import FLAG_NAMES, BuildOptions, UpdateOptions
from transresnet.options import Device, add_arguments, choices, from_namespace
from transresnet.tables import format_table

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("index", help="build, inspect and query caption indexes")
    commands = parser.add_subparsers(dest="index_command", metavar="SUBCOMMAND", required=True)
    _register_build(commands)
    _register_add(commands)
    _register_remove(commands)
    _register_info(commands)
    _register_query(commands)
    _register_verify(commands)
    _register_rollback(commands)


def _register_build(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("build", help="encode captions with a checkpoint and publish a FAISS index version")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--captions", required=True, type=Path, nargs="+", metavar="SOURCE",
                   help="captions: .txt (one per line), .csv, .jsonl or .parquet with a 'caption' column; several "
                        "files or a folder of them are read as one source")
    p.add_argument("--out", required=True, type=Path, help="INDEX_ROOT (versions are published under it)")
    add_arguments(p, BuildOptions, renames=FLAG_NAMES)
    p.add_argument("--device", choices=choices(Device), default="auto", help="encoder device (default: auto)")
    p.set_defaults(func=cmd_build)


def _register_add(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("add", help="publish a new version: the current one plus new captions (only those "
                                        "are encoded; no rebuild)")
    p.add_argument("--index", required=True, type=Path, help="INDEX_ROOT whose current version is added to")
    p.add_argument("--captions", required=True, type=Path,
                   help="new captions, in any format index build reads; ones already indexed are skipped")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="checkpoint directory; its text fingerprint must be the index's")
    add_arguments(p, UpdateOptions)
    p.add_argument("--device", choices=choices(Device), default="auto", help="encoder device (default: auto)")
    p.set_defaults(func=cmd_add)


def _register_remove(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("remove", help="publish a new version: the current one without some captions")
    p.add_argument("--index", required=True, type=Path, help="INDEX_ROOT whose current version is removed from")
    p.add_argument("--ids", required=True, type=Path,
                   help="caption ids to remove: one per line, or a .csv/.tsv with an 'id' column, or .jsonl")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint directory; when given, refused unless its fingerprint is the index's")
    add_arguments(p, UpdateOptions, exclude=("batch_size", "precision"))
    p.set_defaults(func=cmd_remove)


def _register_info(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("info", help="print an index's manifest (JSON)")
    p.add_argument("index", type=Path, help="INDEX_ROOT or a version directory")
    p.add_argument("--versions", action="store_true", help="also list the published versions")
    p.set_defaults(func=cmd_info)


def _register_query(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("query", help="rank captions for an image and a personality")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--index", required=True, type=Path, help="INDEX_ROOT or a version directory")
    p.add_argument("--image", required=True, type=Path, help="image file")
    p.add_argument("--personality", required=True, help="trait, e.g. Sarcastic ('none' for no personality)")
    p.add_argument("-k", type=int, default=5, help="captions to return")
    p.add_argument("--filter", action="store_true",
                   help="rank only captions tagged with this personality in the index")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_query)


def _register_verify(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("verify", help="check every version of an index (sizes, sha256, manifest, FAISS, "
                                           "vector counts, finite vectors); exit 1 when the current one is bad")
    p.add_argument("index", type=Path, help="INDEX_ROOT")
    p.set_defaults(func=cmd_verify)


def _register_rollback(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("rollback", help="point CURRENT at a verified version (atomically)")
    p.add_argument("index", type=Path, help="INDEX_ROOT")
    p.add_argument("version", nargs="?", default=None,
                   help="version name (default: the newest verified version older than the current one)")
    p.set_defaults(func=cmd_rollback)


VERIFY_FAILED = 1
"""Exit status of `index verify` when CURRENT is missing, invalid or names a version that fails."""


def cmd_build(args: argparse.Namespace) -> int:
    options = from_namespace(BuildOptions, args)  # validated before torch and faiss load
    options.refuse_ray_flags(options.model_fields_set)  # the flags given: only those are in the namespace
    if not args.checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory {args.checkpoint} not found")
    if options.engine == "ray" and args.device != "auto":
        raise ValueError("--device applies to --engine local; Ray workers encode on a GPU when given "
                         "--gpus-per-worker, else on CPUs")
    from transresnet.index.captions import source_files

    source_files(args.captions)  # every path exists and has a known format, before torch loads

    from transresnet.checkpoint import load_checkpoint
    from transresnet.devices import resolve_device
    from transresnet.index.build import build_index

    # The ray engine's driver only fingerprints the checkpoint; its workers load their own copies.
    device = "cpu" if options.engine == "ray" else resolve_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint, device=device)
    print(build_index(checkpoint, args.captions, args.out, options).summary())
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    update = from_namespace(UpdateOptions, args)
    if not args.checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory {args.checkpoint} not found")

    from transresnet.checkpoint import load_checkpoint
    from transresnet.devices import resolve_device
    from transresnet.index.incremental import add_captions

    checkpoint = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    print(add_captions(args.index, args.captions, checkpoint, update).message)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    update = from_namespace(UpdateOptions, args)
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory {args.checkpoint} not found")

    from transresnet.index.incremental import remove_captions

    checkpoint = None
    if args.checkpoint is not None:
        from transresnet.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(args.checkpoint, device="cpu")  # only its fingerprint is read
    print(remove_captions(args.index, args.ids, checkpoint=checkpoint, update=update).message)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from transresnet.index.store import list_versions, read_current, read_manifest, resolve_version_dir

    version_dir = resolve_version_dir(args.index)
    manifest = read_manifest(version_dir)
    if args.versions:
        root = version_dir.parent.parent
        manifest = {"current": read_current(root), "versions": list_versions(root), "manifest": manifest}
    print(json.dumps(manifest, indent=1))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    import torch

    from transresnet.checkpoint import load_checkpoint
    from transresnet.devices import resolve_device
    from transresnet.encode import encode_queries
    from transresnet.images import ImagePreprocessor
    from transresnet.index.search import load_index

    if not args.image.is_file():
        raise FileNotFoundError(f"image {args.image} not found")
    checkpoint = load_checkpoint(args.checkpoint, device=resolve_device("auto"))
    caption_index = load_index(args.index, checkpoint=checkpoint)
    slot = checkpoint.traits.lookup(args.personality)
    pixels = ImagePreprocessor(checkpoint.config.model.image).load(args.image)
    query = encode_queries(checkpoint.model, torch.tensor([slot]), images=pixels[None])
    hits = caption_index.search(query, args.k, personality=args.personality if args.filter else None)[0]
    if args.json:
        print(json.dumps([{"rank": i + 1, "score": h.score, "caption": h.caption, "id": h.id,
                           "metadata": h.metadata} for i, h in enumerate(hits)], indent=1))
        return 0
    rows = [[str(i + 1), f"{h.score:.4f}", h.caption, h.metadata.get("personality") or "", h.id]
            for i, h in enumerate(hits)]
    print(f"{args.image} as {checkpoint.traits.name_of(slot)} (index {caption_index.version}):")
    print(format_table(["rank", "score", "caption", "personality", "id"], rows))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from transresnet.index.verify import verify_root

    if not (args.index / "versions").is_dir():
        raise FileNotFoundError(f"no caption index at {args.index} (no versions/ folder)")
    report = verify_root(args.index)
    print(f"{args.index}: CURRENT = {report.current!r}")
    print(report.table())
    if report.current_ok:
        bad = [v.version for v in report.versions if not v.ok]
        print(f"current version ok{f'; {len(bad)} other version(s) fail verification' if bad else ''}")
        return 0
    print(f"CURRENT is bad: {report.pointer_problem}; repoint it with `transresnet index rollback {args.index}`")
    return VERIFY_FAILED


def cmd_rollback(args: argparse.Namespace) -> int:
    from transresnet.index.verify import rollback

    old, new = rollback(args.index, args.version)
    print(f"{args.index}: CURRENT {old!r} -> {new!r}")
    return 0
