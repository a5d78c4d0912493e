"""`transresnet index build | info | query`. Light at import: torch and faiss load inside the handlers."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq", "auto")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("index", help="build, inspect and query caption indexes")
    commands = parser.add_subparsers(dest="index_command", metavar="SUBCOMMAND", required=True)
    _register_build(commands)
    _register_info(commands)
    _register_query(commands)


def _register_build(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("build", help="encode captions with a checkpoint and publish a FAISS index version",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--captions", required=True, type=Path,
                   help="captions: .txt (one per line), .csv or .jsonl with a 'caption' column")
    p.add_argument("--out", required=True, type=Path, help="INDEX_ROOT (versions are published under it)")
    p.add_argument("--type", dest="index_type", choices=INDEX_TYPES, default="flat",
                   help="flat = exact; ivf, hnsw, ivfpq = approximate; auto = by size and memory budget")
    p.add_argument("--keep", type=int, default=3, help="index versions kept (the current one always)")
    p.add_argument("--batch-size", type=int, default=128, help="captions per encoder batch")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="encoder precision; reduced precision is used only within tolerance of float32")
    p.add_argument("--recall-target", type=float, default=0.95,
                   help="recall@k against exact search the approximate index is tuned to")
    p.add_argument("--recall-k", type=int, default=10, help="the k of the recall target")
    p.add_argument("--queries", type=Path, default=None,
                   help=".npy of real query vectors (n, D) for tuning; default: held-out caption vectors")
    p.add_argument("--tune-queries", type=int, default=1000, help="held-out caption vectors used for tuning")
    p.add_argument("--memory-budget", default=None, help="memory budget for --type auto, e.g. 4G "
                   "(default: half the RAM, at most 16G)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(n))")
    p.add_argument("--pq-m", type=int, default=None, help="PQ bytes per vector (must divide the dimension)")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree")
    p.add_argument("--ef-construction", type=int, default=80, help="HNSW build beam width")
    p.add_argument("--refine", action="store_true", help="ivfpq: re-rank candidates with exact vectors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="encoder device")
    p.set_defaults(func=cmd_build)


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


def cmd_build(args: argparse.Namespace) -> int:
    from index.build import BuildOptions, build_index
    from transresnet.checkpoint import load_checkpoint
    from transresnet.devices import resolve_device

    options = BuildOptions(index_type=args.index_type, keep=args.keep, batch_size=args.batch_size,
                           precision=args.precision, recall_target=args.recall_target, recall_k=args.recall_k,
                           queries=str(args.queries) if args.queries else None, tune_queries=args.tune_queries,
                           memory_budget=args.memory_budget, nlist=args.nlist, pq_m=args.pq_m,
                           hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, refine=args.refine,
                           seed=args.seed)
    checkpoint = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    version = build_index(checkpoint, args.captions, args.out, options)
    manifest = json.loads((version / "manifest.json").read_text())
    tuning = manifest["index"]["tuning"]
    recall = "exact" if tuning["target"] is None else f"recall@{tuning['k']} {tuning['recall']:.3f}"
    print(f"published {version} ({manifest['count']} captions, {manifest['index']['factory']}, {recall}, "
          f"{manifest['build']['seconds']['total_s']:.1f}s)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from index.store import list_versions, read_current, read_manifest, resolve_version_dir

    version_dir = resolve_version_dir(args.index)
    manifest = read_manifest(version_dir)
    if args.versions:
        root = version_dir.parent.parent
        manifest = {"current": read_current(root), "versions": list_versions(root), "manifest": manifest}
    print(json.dumps(manifest, indent=1))
    return 0


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def cmd_query(args: argparse.Namespace) -> int:
    import torch

    from index.encode import encode_queries
    from index.search import load_index
    from transresnet.checkpoint import load_checkpoint
    from transresnet.devices import resolve_device
    from transresnet.images import ImagePreprocessor, open_rgb

    if not args.image.is_file():
        raise FileNotFoundError(f"image {args.image} not found")
    checkpoint = load_checkpoint(args.checkpoint, device=resolve_device("auto"))
    caption_index = load_index(args.index, checkpoint=checkpoint)
    slot = checkpoint.traits.lookup(args.personality)
    pixels = ImagePreprocessor(checkpoint.config.model.image)(open_rgb(args.image))
    query = encode_queries(checkpoint.model, torch.tensor([slot]), images=pixels[None])
    hits = caption_index.search(query, args.k, personality=args.personality if args.filter else None)[0]
    if args.json:
        print(json.dumps([{"rank": i + 1, "score": h.score, "caption": h.caption, "id": h.id,
                           "metadata": h.metadata} for i, h in enumerate(hits)], indent=1))
        return 0
    rows = [[str(i + 1), f"{h.score:.4f}", h.caption, h.metadata.get("personality") or "", h.id]
            for i, h in enumerate(hits)]
    print(f"{args.image} as {checkpoint.traits.name_of(slot)} (index {caption_index.version}):")
    print(format_table(rows, ["rank", "score", "caption", "personality", "id"]))
    return 0
