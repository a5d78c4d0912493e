"""``transresnet data synth|voices|download``: dataset tools (heavy imports happen in the handlers)."""

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


def _voices(args: argparse.Namespace) -> int:
    from transresnet.voices import write_voiced_dataset

    csv_path = write_voiced_dataset(args.captions, Path(args.out), seed=args.seed, image_dir=args.image_dir,
                                    num_candidates=args.candidates)
    logger.info("wrote %s", csv_path)
    return 0


def _download(args: argparse.Namespace) -> int:
    from transresnet.download import download

    path = download(args.name, Path(args.out), urls=args.url, base_url=args.base_url, timeout=args.timeout,
                    workers=args.workers, limit=args.limit)
    logger.info("dataset ready: %s", path)
    return 0


def _register_synth(data_sub: argparse._SubParsersAction) -> None:
    synth = data_sub.add_parser("synth", help="generate the synthetic personality-caption dataset")
    synth.add_argument("--out", required=True, help="output folder (images/, captions.csv, val.json, test.json)")
    synth.add_argument("--images", type=int, default=2000, help="number of images to draw (default: 2000)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the drawing (default: 0)")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    synth.set_defaults(func=_synth)


def _register_voices(data_sub: argparse._SubParsersAction) -> None:
    voices = data_sub.add_parser(
        "voices", help="rewrite every caption of a captioned photo set in the synthetic generator's voices",
        description="Rewrite every caption of a photo set in every voice of the synthetic generator (templates: a "
                    "proxy for Personality-Captions). OUT gets captions.csv (with a personality column), "
                    "personalities.txt, val.json/test.json (100 candidates per example) and images/ (links to "
                    "the source photos, so nothing is copied).")
    voices.add_argument("--captions", required=True,
                        help="source dataset: CSV image,split,caption (or any format the readers take)")
    voices.add_argument("--out", required=True, help="output folder")
    voices.add_argument("--image-dir", help="photo folder of the source (default: the reader's, images/ beside it)")
    voices.add_argument("--seed", type=int, default=0, help="seed of template and candidate choices (default: 0)")
    voices.add_argument("--candidates", type=int, default=100, help="candidates per val/test example (default: 100)")
    voices.set_defaults(func=_voices)


def _register_download(data_sub: argparse._SubParsersAction) -> None:
    from transresnet.download import DATASETS

    listing = "; ".join(f"{name}: {source.description}" for name, source in DATASETS.items())
    download = data_sub.add_parser(
        "download", help="fetch a real dataset (flickr8k, personality-captions) into the readers' layout",
        description=f"Fetch a real dataset into OUT. {listing}. A rerun fetches only what is missing (a file cut "
                    "off is fetched again whole); photos that fail are listed in OUT/failed_images.txt and skipped.")
    download.add_argument("name", choices=list(DATASETS), metavar="NAME", help=", ".join(DATASETS))
    download.add_argument("--out", required=True, help="dataset folder (captions.csv or the JSON splits, images/)")
    download.add_argument("--url", action="append", default=[], metavar="[KEY=]URL",
                          help="another mirror of an archive (repeatable): flickr8k images=URL, text=URL; "
                               "personality-captions archive=URL or the bare URL")
    download.add_argument("--base-url", help="personality-captions: base URL of the YFCC100M photos "
                                             "(photo H at BASE/H[:3]/H[3:6]/H.jpg)")
    download.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a server (default: 60)")
    download.add_argument("--workers", type=int, default=8, help="photos fetched at once (default: 8)")
    download.add_argument("--limit", type=int, help="personality-captions: fetch at most this many missing photos")
    download.set_defaults(func=_download)


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="dataset tools: synthetic data, voiced captions, downloads")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    _register_synth(data_sub)
    _register_voices(data_sub)
    _register_download(data_sub)
