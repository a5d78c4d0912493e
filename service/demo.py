"""The embedded demo: with no checkpoint and index configured, build a synthetic pair once and cache it.

Steps (first start only, a few minutes on 2 CPU cores): draw the synthetic personality-caption images,
train ``configs/synthetic.yaml`` on them, index their captions. A ``demo.json`` marker written last makes
later starts reuse the cache; a file lock keeps two servers from building it at the same time.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_IMAGES = 2000
MARKER = "demo.json"


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def _train_overrides(data: Path, folder: Path) -> list[str]:
    return [f"data.train={data / 'captions.csv'}", f"data.val={data / 'val.json'}",
            f"data.test={data / 'test.json'}", f"model.personality.traits_file={data / 'personalities.txt'}",
            f"data.feature_cache={folder / 'features'}"]


def build_demo(folder: Path, *, num_images: int = DEMO_IMAGES, overrides: list[str] | None = None) -> tuple[Path, Path]:
    """Generate data, train, index; returns (checkpoint dir, index root). Blocking, minutes."""
    from transresnet.index import build_index

    from transresnet.checkpoint import load_checkpoint
    from transresnet.config import load_config, shipped_config
    from transresnet.runtime import utc_timestamp
    from transresnet.synth import generate_synthetic_dataset
    from transresnet.train import train

    start = time.perf_counter()
    data = folder / "data"
    logger.info("demo 1/3: drawing %d synthetic images into %s", num_images, data)
    captions = generate_synthetic_dataset(data, num_images, seed=0)
    config = load_config(shipped_config("synthetic.yaml"), _train_overrides(data, folder) + list(overrides or []))
    logger.info("demo 2/3: training %s (a few minutes on a laptop CPU)", config.name)
    result = train(config, folder / "run")
    logger.info("demo 3/3: indexing the captions of %s", captions)
    index_root = folder / "index"
    build_index(load_checkpoint(result.best_checkpoint), captions, index_root)
    record = {"checkpoint": str(result.best_checkpoint), "index_root": str(index_root),
              "metrics": result.metrics, "built": utc_timestamp(),
              "seconds": round(time.perf_counter() - start, 1)}
    (folder / MARKER).write_text(json.dumps(record, indent=1, default=str))
    logger.info("demo built in %.0fs, cached in %s", record["seconds"], folder)
    return result.best_checkpoint, index_root


def ensure_demo(folder: Path, **kwargs: object) -> tuple[Path, Path]:
    """The cached demo (checkpoint, index root) under ``folder``, building it first if needed."""
    folder = Path(folder).resolve()
    cached = _cached(folder)
    if cached:
        logger.info("using the cached demo in %s", folder)
        return cached
    with _exclusive(folder):
        cached = _cached(folder)  # another process may have finished it while we waited for the lock
        if cached:
            return cached
        logger.info("building the embedded demo in %s (first start only)", folder)
        return build_demo(folder, **kwargs)  # type: ignore[arg-type]
