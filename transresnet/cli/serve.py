"""``transresnet serve``: run the API with uvicorn. Light at import; the app is built inside the handler."""

from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path
from typing import Any

from transresnet.options import Device, ImagePrecision, IndexPlacement, choices

logger = logging.getLogger(__name__)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags the user gave; unset flags leave the environment / .env settings alone."""
    values = {
        "checkpoint": args.checkpoint, "index_root": args.index, "host": args.host, "port": args.port,
        "device": args.device, "max_batch": args.max_batch, "max_search_batch": args.max_search_batch,
        "max_wait_ms": args.max_wait_ms, "max_in_flight": args.max_in_flight,
        "cpu_threads": args.threads, "demo_dir": args.demo_dir, "log_level": args.log_level,
        "follow_index": args.follow_index, "index_placement": args.index_placement,
        "image_precision": args.image_precision,
        "generator": args.generator, "max_beam_size": args.max_beam_size, "consensus_k": args.consensus_k,
    }
    if args.no_batching:
        values["batching"] = False
    if args.mmap:
        values["index_mmap"] = True
    return {key: value for key, value in values.items() if value is not None}


def _curl_example(base: str) -> str:
    return f"curl -F image=@photo.jpg -F personality=Sweet -F personality=Sarcastic -F k=3 {base}/v1/captions"


def _check_paths(checkpoint: Path, index_root: Path) -> None:
    """Fail before uvicorn starts, with a message instead of a startup traceback."""
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found: train one with `transresnet train --config "
                                "CONFIG --out RUN` and pass RUN/best")
    if not index_root.exists():
        raise FileNotFoundError(f"index {index_root} not found: build one with `transresnet index build "
                                f"--checkpoint {checkpoint} --captions FILE --out {index_root}`")


def check_port_free(host: str, port: int) -> None:
    """The address uvicorn will bind is free (bound the way uvicorn binds it, with SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ValueError(f"cannot listen on {host}:{port} ({err.strerror}): another server uses it? pass "
                             "--port N or set TRANSRESNET_PORT") from None


def check_servable(checkpoint: Path, index_root: Path) -> None:
    """The checkpoint is complete and intact (meta, checksums) and the index root holds a published
    version: failures a user can fix answer in one line here, before the model loads inside the server.
    (Which version is served, CURRENT or a verified fallback, is decided when the server starts.)"""
    from transresnet.checkpoint import read_meta, verify_checksums
    from transresnet.index.store import MANIFEST_FILE, IndexLoadError, list_versions

    verify_checksums(checkpoint, read_meta(checkpoint))
    if not (index_root / MANIFEST_FILE).is_file() and not list_versions(index_root):
        raise IndexLoadError(f"{index_root} holds no published index version: build one with `transresnet index "
                             f"build --checkpoint {checkpoint} --captions FILE --out {index_root}`")


def _ensure_demo(args: argparse.Namespace, demo_dir: Path) -> tuple[Path, Path]:
    """The embedded demo named by --demo (--data alone means the real-photo one), built once and cached."""
    from transresnet.service.demo import ensure_demo

    name = args.demo or ("flickr8k" if args.data is not None else "synthetic")
    if name == "synthetic" and args.data is not None:
        raise ValueError("--data gives the photos of --demo flickr8k; the synthetic demo draws its own")
    logger.info("no checkpoint or index configured: serving the embedded %s demo", name)
    return ensure_demo(demo_dir, name, data=args.data)


def check_generator(path: Path) -> None:
    """A --generator names an intact caption-generator checkpoint: said in one line before the server starts."""
    from transresnet.checkpoint import read_meta, verify_checksums
    from transresnet.generation.checkpoint import REQUIRED

    if not path.is_dir():
        raise FileNotFoundError(f"generator {path} not found: train one with `transresnet train --config "
                                "configs/flickr8k_updown.yaml --out RUN` and pass RUN/best")
    meta = read_meta(path, required_files=())
    if meta.get("kind") != "generator":
        raise ValueError(f"{path} is not a caption-generator checkpoint (meta.json kind {meta.get('kind')!r}): "
                         "--generator takes a showtell, showatttell or updown run's best/, --checkpoint the "
                         "retrieval one")
    verify_checksums(path, read_meta(path, required_files=REQUIRED))


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from transresnet.service.settings import ServiceSettings

    settings = ServiceSettings(**_overrides(args))
    check_port_free(settings.host, settings.port)  # before anything slow, the demo build included
    if settings.checkpoint is None and settings.index_root is None:
        checkpoint, index_root = _ensure_demo(args, settings.demo_dir)
        settings = settings.model_copy(update={"checkpoint": checkpoint, "index_root": index_root})
    elif args.demo is not None or args.data is not None:
        raise ValueError("--demo and --data build an embedded demo: give them without --checkpoint and --index "
                         "(or TRANSRESNET_CHECKPOINT and TRANSRESNET_INDEX_ROOT)")
    elif settings.checkpoint is None or settings.index_root is None:
        raise ValueError("give both --checkpoint and --index (or TRANSRESNET_CHECKPOINT and "
                         "TRANSRESNET_INDEX_ROOT), or neither for the embedded demo")

    _check_paths(settings.checkpoint, settings.index_root)
    check_servable(settings.checkpoint, settings.index_root)
    if settings.generator is not None:
        check_generator(settings.generator)

    from transresnet.service.main import create_app
    from transresnet.service.server import server_options

    app = create_app(settings)
    shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"http://{shown_host}:{settings.port}"
    logger.info("web page: %s/   API docs: %s/docs", base, base)
    logger.info("try: %s", _curl_example(base))
    uvicorn.run(app, **server_options(settings))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve the caption ranking API and web page",
        description="Serve a checkpoint and caption index over HTTP. Flags override TRANSRESNET_* environment "
                    "variables and .env; with no checkpoint and index at all, an embedded demo (--demo: synthetic "
                    "shapes, or flickr8k real photos) is built once (cached in --demo-dir) and served.")
    serve.add_argument("--checkpoint", type=Path, help="checkpoint directory (e.g. runs/flickr8k/best)")
    serve.add_argument("--index", type=Path, help="index root (its current version is served) or a version dir")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--device", choices=choices(Device), help="where the model runs (default auto)")
    serve.add_argument("--image-precision", choices=choices(ImagePrecision), help="image runtime (default float32)")
    serve.add_argument("--max-batch", type=int, help="most images encoded together (default 16; 32+ on a GPU)")
    serve.add_argument("--max-search-batch", type=int, help="most requests searched together (default 64)")
    serve.add_argument("--max-wait-ms", type=float, help="how long a batch waits to fill (default 5)")
    serve.add_argument("--max-in-flight", type=int,
                       help="caption requests admitted at once; beyond it 503 with Retry-After (default 48)")
    serve.add_argument("--no-batching", action="store_true", help="encode and search one request at a time")
    serve.add_argument("--threads", type=int, help="torch CPU threads for image encoding (default: torch's)")
    serve.add_argument("--mmap", action="store_true",
                       help="memory-map the index vectors and captions instead of reading them (searched on CPU)")
    serve.add_argument("--index-placement", choices=choices(IndexPlacement),
                       help="where the index is searched when FAISS sees GPUs (default auto)")
    serve.add_argument("--follow-index", type=float, metavar="SECONDS",
                       help="poll the index root's CURRENT every SECONDS and swap to the version it names")
    from transresnet.service.demo import DEMOS  # stdlib-only at import

    serve.add_argument("--demo", choices=list(DEMOS),
                       help="the embedded demo served without --checkpoint/--index: synthetic (default, offline: "
                            "drawn shapes) or flickr8k (real photos in ten voices, EfficientNet-Lite2; photos "
                            "from --data, else downloaded once, about 1.1 GB)")
    serve.add_argument("--data", type=Path, metavar="DIR",
                       help="--demo flickr8k: photo folder in the CSV layout (captions.csv image,split,caption and "
                            "images/), e.g. ../shared/data/flickr8k-1k; another folder builds another demo")
    serve.add_argument("--demo-dir", type=Path, help="cache of the embedded demos (default .cache/demo)")
    serve.add_argument("--generator", type=Path, metavar="DIR",
                       help="a caption-generator checkpoint (e.g. runs/flickr8k_updown/best) served beside "
                            "retrieval: POST /v1/captions mode=generate or mode=hybrid")
    serve.add_argument("--max-beam-size", type=int, help="largest beam a request may ask for (default 8)")
    serve.add_argument("--consensus-k", type=int,
                       help="nearest index captions a candidate is compared with when a request asks for "
                            "consensus re-ranking (default 10)")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn and service log level (default info)")
    serve.set_defaults(func=_serve)
