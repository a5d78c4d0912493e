"""The embedded demos: with no checkpoint and index configured, build a (checkpoint, index) pair once and cache it.

Every demo is a recipe (:data:`DEMOS`): a shipped training config, training overrides and a data step. They
share one path: prepare the data, train, index the captions, write a ``demo.json`` marker last.

- ``synthetic`` (the default, offline, a few minutes on 2 CPU cores): draw the synthetic images in ten
  voices, train ``configs/synthetic.yaml``, index their captions. It knows drawn shapes, not photos.
- ``flickr8k`` (real photos): the photos of a folder in the readers' CSV layout (``captions.csv`` and
  ``images/``; ``--data``) or of ``transresnet data download flickr8k``, every caption rewritten in the ten
  voices (``transresnet data voices``), the EfficientNet-Lite2 TransResNet with the personality encoder
  trained on them (``configs/flickr8k_voices.yaml`` with ``configs/flickr8k.yaml``'s image encoder), and an
  index of the whole voiced caption pool.

Each build lives in ``DEMO_DIR/<name>-<key>/``; the key hashes everything the build reads (recipe, config
text, overrides, the data's captions file), so another ``--data`` or an edited config builds anew instead of
serving a stale cache. A file lock per build keeps two servers from building the same one at once. Frozen
backbone features are cached in ``DEMO_DIR/features`` (keyed by backbone, weights, preprocessing and the
resolved photo path), so a rebuild of the same photos skips them.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_IMAGES = 2000
MARKER = "demo.json"
RECIPE_VERSION = 2
"""Part of every cache key: bump it when a recipe's steps change, so old caches are not served."""

FLICKR8K_TRAIN_PHOTOS = 700
FLICKR8K_VAL_PHOTOS = 100
"""The flickr8k demo trains on at most this many photos per split (the first by name): the size of
../shared's flickr8k-1k, so a full download still builds in minutes on a CPU."""


class DemoDataError(ValueError):
    """A demo cannot get its data; the message says what to pass (the CLI prints it as one line)."""


@dataclass(frozen=True)
class DemoRequest:
    """What one demo build is asked for: the recipe's inputs besides its own settings."""

    data: Path | None = None
    """flickr8k: a folder (or its captions.csv) in the readers' CSV layout; None = download Flickr8k."""
    num_images: int = DEMO_IMAGES
    """synthetic: images to draw."""
    overrides: tuple[str, ...] = ()
    """Training config overrides after the recipe's own (tests use them for tiny models)."""


@dataclass(frozen=True)
class DemoData:
    """A recipe's prepared data: the training overrides that point at it and the captions to index."""

    overrides: list[str]
    captions: Path


@dataclass(frozen=True)
class DemoRecipe:
    name: str
    config: str
    """Shipped training config (``configs/``)."""
    summary: str
    prepare: Callable[[Path, DemoRequest], DemoData]
    overrides: Callable[[], list[str]] = list
    """The recipe's own training overrides (a function: some read another shipped config)."""
    inputs: Callable[[DemoRequest], dict[str, object]] = lambda request: {}
    """What, besides config and overrides, decides the build (hashed into the cache key)."""


# --------------------------------------------------------------------------------------------------
# The synthetic recipe
# --------------------------------------------------------------------------------------------------


def _prepare_synthetic(folder: Path, request: DemoRequest) -> DemoData:
    from transresnet.synth import generate_synthetic_dataset

    data = folder / "data"
    logger.info("demo: drawing %d synthetic images into %s", request.num_images, data)
    captions = generate_synthetic_dataset(data, request.num_images, seed=0)
    overrides = [f"data.train={captions}", f"data.val={data / 'val.json'}", f"data.test={data / 'test.json'}",
                 f"model.personality.traits_file={data / 'personalities.txt'}",
                 f"data.feature_cache={folder.parent / 'features'}"]
    return DemoData(overrides, captions)


# --------------------------------------------------------------------------------------------------
# The flickr8k recipe
# --------------------------------------------------------------------------------------------------


def _project_root() -> Path:
    """The folder ``configs/`` sits in (a checkout's root): ../shared paths in configs are relative to it."""
    from transresnet.config import shipped_config

    return shipped_config("flickr8k.yaml").parent.parent


def _flickr8k_image_encoder() -> dict[str, object]:
    """configs/flickr8k.yaml's image encoder (EfficientNet-Lite2, 260 px), the one source of its settings."""
    import yaml

    from transresnet.config import shipped_config

    image = dict(yaml.safe_load(shipped_config("flickr8k.yaml").read_text())["model"]["image"])
    weights = Path(image["weights"])
    if not weights.is_absolute() and not weights.is_file():  # relative to the checkout, wherever we run
        image["weights"] = str((_project_root() / weights).resolve())
    return image


FLICKR8K_EPOCHS = 10
"""The config's 40 epochs cost about an hour on a busy 2-core CPU (90 s an epoch): the demo trains 10."""


def _flickr8k_overrides() -> list[str]:
    # One JSON override replaces the whole section, MobileNetV2's backbone_kwargs included.
    return [f"model.image={json.dumps(_flickr8k_image_encoder())}", f"train.epochs={FLICKR8K_EPOCHS}"]


def _source_csv(data: Path) -> Path:
    """``--data`` as its captions.csv, checked to be the readers' CSV layout."""
    csv_path = data / "captions.csv" if data.is_dir() else data
    if not csv_path.is_file() or not (csv_path.parent / "images").is_dir():
        raise DemoDataError(f"--data {data} is not a photo folder in the CSV layout: it needs captions.csv "
                            "(image,split,caption) and images/ beside it, e.g. ../shared/data/flickr8k-1k")
    return csv_path


def _downloaded_flickr8k(demo_dir: Path) -> Path:
    """Flickr8k fetched once into DEMO_DIR/flickr8k-data (``transresnet data download flickr8k``)."""
    from transresnet.download import DATASETS, download_flickr8k

    out = demo_dir / "flickr8k-data"
    if (out / "captions.csv").is_file():
        return out / "captions.csv"
    source = DATASETS["flickr8k"]
    urls = ", ".join(remote.url for remote in source.archives.values())
    logger.info("no --data: downloading Flickr8k into %s, %s, from %s", out, source.description, urls)
    with _exclusive(demo_dir / ".flickr8k-download"):
        try:
            return download_flickr8k(out)
        except OSError as err:  # offline, refused, cut off: say what to pass instead of a traceback
            reason = getattr(err.__cause__, "reason", None) or err.strerror or err  # urllib's own words
            raise DemoDataError(
                f"the flickr8k demo needs photos and could not download Flickr8k ({reason}): pass --data DIR, a "
                "folder with captions.csv (image,split,caption) and images/, e.g. --data "
                "../shared/data/flickr8k-1k") from None


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _demo_subset(csv_path: Path, out: Path) -> Path:
    """``csv_path`` itself when it is small enough, else the first photos of each split written to ``out``
    (captions only: the photos stay where they are, the voices step links them)."""
    rows = _read_rows(csv_path)
    limits = {"train": FLICKR8K_TRAIN_PHOTOS, "val": FLICKR8K_VAL_PHOTOS}
    photos = {split: sorted({r["image"] for r in rows if r.get("split") == split}) for split in limits}
    if not photos["train"] or not photos["val"]:
        raise DemoDataError(f"{csv_path} needs photos of both the train and the val split (its split column); "
                            f"it has {len(photos['train'])} train and {len(photos['val'])} val photos")
    if all(len(photos[s]) <= limits[s] for s in limits) and not any(r.get("split") not in limits for r in rows):
        return csv_path
    keep = {name for split, limit in limits.items() for name in photos[split][:limit]}
    kept = [r for r in rows if r["image"] in keep and r.get("split") in limits]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "captions.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["image", "split", "caption"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
    logger.info("demo: training on %d of the %d photos of %s (the first %d train and %d val)", len(keep),
                len({r['image'] for r in rows}), csv_path, *limits.values())
    return out / "captions.csv"


def _flickr8k_source(folder: Path, request: DemoRequest) -> Path:
    return _source_csv(request.data) if request.data is not None else _downloaded_flickr8k(folder.parent)


def _prepare_flickr8k(folder: Path, request: DemoRequest) -> DemoData:
    from transresnet.voices import write_voiced_dataset

    source = _flickr8k_source(folder, request)
    subset = _demo_subset(source, folder / "source")
    voices = folder / "voices"
    logger.info("demo: rewriting the captions of %s in the ten voices into %s", subset, voices)
    captions = write_voiced_dataset(subset, voices, seed=0, image_dir=source.parent / "images")
    overrides = [f"data.train={captions}", f"data.val={voices / 'val.json'}",
                 f"model.personality.traits_file={voices / 'personalities.txt'}",
                 f"data.feature_cache={folder.parent / 'features'}"]
    return DemoData(overrides, captions)


def _flickr8k_inputs(request: DemoRequest) -> dict[str, object]:
    """The data's identity: where it is and what its captions file holds (another --data rebuilds)."""
    if request.data is None:
        return {"data": "download"}
    csv_path = _source_csv(request.data)
    from transresnet.files import sha256_file

    return {"data": str(csv_path.resolve()), "captions_sha256": sha256_file(csv_path)}


DEMOS: dict[str, DemoRecipe] = {
    "synthetic": DemoRecipe(
        "synthetic", "synthetic.yaml", "synthetic drawn shapes in ten voices, a small CNN (offline, minutes)",
        _prepare_synthetic, inputs=lambda request: {"num_images": request.num_images}),
    "flickr8k": DemoRecipe(
        "flickr8k", "flickr8k_voices.yaml",
        "real Flickr8k photos in ten template voices, EfficientNet-Lite2 with the personality encoder",
        _prepare_flickr8k, overrides=_flickr8k_overrides, inputs=_flickr8k_inputs),
}


# --------------------------------------------------------------------------------------------------
# The shared build, cache and lock
# --------------------------------------------------------------------------------------------------


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def recipe(name: str) -> DemoRecipe:
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; available: {', '.join(DEMOS)}")
    return DEMOS[name]


def _training_overrides(chosen: DemoRecipe, request: DemoRequest) -> list[str]:
    return chosen.overrides() + list(request.overrides)


def demo_key(chosen: DemoRecipe, request: DemoRequest) -> str:
    """Hash of everything a build reads: the recipe, its config's text, the overrides and the data."""
    from transresnet.config import shipped_config

    inputs = {"recipe": chosen.name, "version": RECIPE_VERSION,
              "config": hashlib.sha256(shipped_config(chosen.config).read_bytes()).hexdigest(),
              "overrides": _training_overrides(chosen, request), **chosen.inputs(request)}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def demo_folder(demo_dir: Path, name: str, request: DemoRequest | None = None) -> Path:
    """Where the demo ``name`` for ``request`` is (or will be) cached: DEMO_DIR/<name>-<key>."""
    chosen = recipe(name)
    return Path(demo_dir).resolve() / f"{name}-{demo_key(chosen, request or DemoRequest())}"


def _cached(folder: Path) -> tuple[Path, Path] | None:
    marker = folder / MARKER
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    checkpoint, index_root = Path(record["checkpoint"]), Path(record["index_root"])
    if checkpoint.is_dir() and index_root.is_dir():
        return checkpoint, index_root
    logger.warning("demo cache %s is incomplete; rebuilding it", folder)
    return None


def build_demo(folder: Path, name: str = "synthetic", request: DemoRequest | None = None) -> tuple[Path, Path]:
    """Prepare data, train, index into ``folder``; returns (checkpoint dir, index root). Blocking, minutes."""
    from transresnet.index import build_index

    from transresnet.checkpoint import load_checkpoint
    from transresnet.config import load_config, shipped_config
    from transresnet.runtime import utc_timestamp
    from transresnet.train import train

    chosen, request = recipe(name), request or DemoRequest()
    start = time.perf_counter()
    # Config errors and missing weights are one line before minutes of data preparation, not after.
    _check_weights(load_config(shipped_config(chosen.config), _training_overrides(chosen, request)).model.image.weights)
    logger.info("demo %s 1/3: preparing its data in %s", name, folder)
    data = chosen.prepare(folder, request)
    config = load_config(shipped_config(chosen.config), data.overrides + _training_overrides(chosen, request))
    logger.info("demo %s 2/3: training %s (%s)", name, config.name, chosen.summary)
    result = train(config, folder / "run")
    logger.info("demo %s 3/3: indexing the captions of %s", name, data.captions)
    index_root = folder / "index"
    build_index(load_checkpoint(result.best_checkpoint), data.captions, index_root)
    record = {"demo": name, "key": folder.name.rsplit("-", 1)[-1], "checkpoint": str(result.best_checkpoint),
              "index_root": str(index_root), "data": str(request.data) if request.data else None,
              "overrides": _training_overrides(chosen, request), "metrics": result.metrics,
              "built": utc_timestamp(), "seconds": round(time.perf_counter() - start, 1)}
    (folder / MARKER).write_text(json.dumps(record, indent=1, default=str))  # last: marks the build complete
    logger.info("demo %s built in %.0fs, cached in %s", name, record["seconds"], folder)
    return result.best_checkpoint, index_root


def _check_weights(weights: str | None) -> None:
    """A missing backbone weights file is one line before training, not a traceback inside it."""
    if weights and not Path(weights).is_file():
        raise DemoDataError(f"the demo's backbone weights {weights} are not on this machine (the shipped configs "
                            "read them from ../shared/weights beside the project)")


def ensure_demo(demo_dir: Path, name: str = "synthetic", *, data: Path | None = None,
                num_images: int = DEMO_IMAGES, overrides: Sequence[str] = ()) -> tuple[Path, Path]:
    """The cached demo ``name`` (checkpoint, index root) under ``demo_dir``, building it first if needed."""
    request = DemoRequest(data=Path(data) if data is not None else None, num_images=num_images,
                          overrides=tuple(overrides))
    folder = demo_folder(demo_dir, name, request)
    cached = _cached(folder)
    if cached:
        logger.info("using the cached %s demo in %s", name, folder)
        return cached
    with _exclusive(folder):
        cached = _cached(folder)  # another process may have finished it while we waited for the lock
        if cached:
            return cached
        logger.info("building the %s demo in %s (first start with these inputs only)", name, folder)
        return build_demo(folder, name, request)
