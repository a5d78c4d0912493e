"""Backbone features computed once per image and reused across epochs, runs and evaluations.

A cache lives in ``<root>/<key>/`` where the key hashes the backbone name and kwargs, the weights
(file checksum, timm's pretrained tag, or the checkpoint's own weights), the preprocessing and the
view (centre crop, or the n-th random crop), so a change to any of them starts a fresh cache.
``features.npy`` is memory-mapped on load; ``paths.json`` maps rows to image files. The centre crop's key
also names its test-time views (``model.image.tta``) when there are several, so averaged and single-view
features never share a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from transresnet.config import ImageEncoderConfig
from transresnet.encoders import tail_input
from transresnet.files import sha256_file
from transresnet.images import ImagePreprocessor
from transresnet.options import ImageTTA
from transresnet.progress import progress
from transresnet.runtime import eval_mode

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
Pooling = Literal["avg", "grid"]


def pooled_features(backbone: torch.nn.Module, pixels: torch.Tensor, tta: ImageTTA = "none") -> torch.Tensor:
    """The backbone's pooled features (B, F) of centre crops (B, 3, H, W), averaged over the test-time views
    ``tta``: none = the crops alone; flip = each crop and its mirror image. The one place views are made, so
    the evaluator, the service and the Python API average identically."""
    if tta == "none":
        return backbone(pixels)
    # One pass over the crops and their mirrors: a batch of 2B costs less than two batches of B.
    both = backbone(torch.cat([pixels, pixels.flip(-1)]))
    return (both[:len(pixels)] + both[len(pixels):]) / 2


def backbone_output(backbone: torch.nn.Module, pixels: torch.Tensor, pooling: Pooling = "avg",
                    tta: ImageTTA = "none", tail: int = 0) -> torch.Tensor:
    """avg: the pooled features (B, F) (:func:`pooled_features`); grid: the last feature map as (B, H * W, F).
    ``tail`` > 0 (avg only): the map (B, C, H, W) the backbone's last ``tail`` parts take, for training them."""
    if tail:
        if pooling != "avg" or tta != "none":
            raise ValueError("a trained backbone tail reads single-view maps and pools them itself")
        return tail_input(backbone, pixels, tail)
    if pooling == "avg":
        return pooled_features(backbone, pixels, tta)
    if tta != "none":
        raise ValueError(f"test-time views ({tta}) are averaged over pooled features only, not grids")
    return backbone.forward_features(pixels).flatten(2).transpose(1, 2)


def weights_identity(cfg: ImageEncoderConfig) -> str:
    if cfg.weights:
        return "file:" + sha256_file(Path(cfg.weights))
    return "timm-pretrained" if cfg.pretrained else "random-init"


def cache_key(cfg: ImageEncoderConfig, preprocessor: ImagePreprocessor, *, weights: str, view: int = 0,
              pooling: Pooling = "avg", runtime: str = "float32", tta: ImageTTA = "none", tail: int = 0) -> str:
    """``view`` 0 is the centre crop; view n > 0 is the n-th seeded random crop and flip.

    ``pooling`` avg: global-pooled vectors (N, F); grid: the last feature map's cells (N, cells, F).
    ``runtime``: the image encoder that computed them (:attr:`transresnet.image_runtime.ImageRunner.identity`).
    ``tta``: the test-time views averaged (:func:`pooled_features`).
    ``tail``: the maps before the backbone's last ``tail`` parts instead of its output (:func:`backbone_output`).
    """
    parts = {"format": CACHE_FORMAT, "backbone": cfg.backbone, "kwargs": cfg.backbone_kwargs, "weights": weights,
             "preprocess": preprocessor.identity(), "view": view}
    if pooling != "avg":  # avg keys stay what they were before grids existed
        parts["pooling"] = pooling
    if runtime != "float32":  # and float32 keys what they were before other runtimes
        parts["runtime"] = runtime
    if tta != "none":  # and single-view keys what they were before test-time views
        parts["tta"] = tta
    if tail:
        parts["tail"] = tail
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], preprocessor: ImagePreprocessor, view: int) -> None:
        self.paths = list(paths)
        self.preprocessor = preprocessor
        self.view = view

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.view == 0:
            return self.preprocessor.load(self.paths[i])
        # Seeded per (image, view) so a crop is the same whichever run computes it.
        seed = int(hashlib.sha256(f"{self.paths[i]}:{self.view}".encode()).hexdigest()[:8], 16)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.preprocessor.load(self.paths[i], augment=True)


@torch.inference_mode()
def compute_features(backbone: torch.nn.Module, preprocessor: ImagePreprocessor, paths: Sequence[Path], *,
                     view: int = 0, batch_size: int = 64, num_workers: int = 0,
                     device: torch.device | str = "cpu", desc: str = "image features",
                     pooling: Pooling = "avg", tta: ImageTTA = "none", tail: int = 0) -> np.ndarray:
    """Backbone features of each image, float32 (N, F) or grid (N, cells, F), with a progress bar in images/s;
    pooled ones averaged over the test-time views ``tta`` (:func:`pooled_features`)."""
    # A generator of its own: the loader's worker seeds never draw from (and so never shift) the global RNG,
    # whether or not a run finds its features cached. Crops are seeded per (image, view) in _ImageFiles.
    loader = DataLoader(_ImageFiles(paths, preprocessor, view), batch_size=batch_size, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(view))
    chunks = []
    with eval_mode(backbone), progress(len(paths), desc, "photos") as bar:
        for pixels in loader:
            chunks.append(backbone_output(backbone, pixels.to(device), pooling, tta, tail).float().cpu().numpy())
            bar.update(len(pixels))
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


class FeatureCache:
    """Append-only store of one backbone view's features, keyed by resolved image path."""

    def __init__(self, root: str | Path, key: str) -> None:
        self.folder = Path(root) / key
        self._rows: dict[str, int] = {}
        self._features: np.ndarray | None = None
        self._load()

    def _load(self) -> None:
        paths_file, array_file = self.folder / "paths.json", self.folder / "features.npy"
        if not (paths_file.is_file() and array_file.is_file()):
            return
        try:
            paths = json.loads(paths_file.read_text())
            features = np.load(array_file, mmap_mode="r")
        except (ValueError, OSError) as err:
            logger.warning("feature cache %s is unreadable (%s); recomputing", self.folder, err)
            return
        if len(paths) != len(features):
            logger.warning("feature cache %s is inconsistent; recomputing", self.folder)
            return
        self._rows = {p: i for i, p in enumerate(paths)}
        self._features = features

    def missing(self, paths: Sequence[Path]) -> list[Path]:
        return list(dict.fromkeys(p for p in paths if str(Path(p).resolve()) not in self._rows))

    def add(self, paths: Sequence[Path], features: np.ndarray) -> None:
        """Append rows and rewrite the cache atomically (temp files, then rename)."""
        keys = [str(Path(p).resolve()) for p in paths]
        old = np.asarray(self._features) if self._features is not None else features[:0]
        merged = np.concatenate([old, features.astype(np.float32)])
        ordered = sorted(self._rows, key=self._rows.get) + keys
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp_array, tmp_paths = self.folder / f".features.{os.getpid()}.npy", self.folder / f".paths.{os.getpid()}"
        np.save(tmp_array, merged)
        tmp_paths.write_text(json.dumps(ordered))
        os.replace(tmp_array, self.folder / "features.npy")
        os.replace(tmp_paths, self.folder / "paths.json")
        self._load()

    def get(self, paths: Sequence[Path]) -> np.ndarray:
        assert self._features is not None, "get() before the features were added"
        rows = [self._rows[str(Path(p).resolve())] for p in paths]
        return np.asarray(self._features[rows])


def cached_features(backbone: torch.nn.Module, cfg: ImageEncoderConfig, paths: Sequence[Path], *, root: str | Path,
                    weights: str, views: int = 1, batch_size: int = 64, num_workers: int = 0,
                    device: torch.device | str = "cpu", pooling: Pooling = "avg", tta: ImageTTA = "none",
                    tail: int = 0) -> np.ndarray:
    """Features (N, views, F), or (N, views, cells, F) for grids, computing and caching only what is missing.

    ``backbone`` may be an :class:`transresnet.image_runtime.ImageRunner`: its features are cached apart from
    float32's (keyed by its ``identity``). ``tta``: test-time views averaged for the centre crop (view 0, what
    evaluation reads); training's random crops are single views whatever it is. ``tail``: the maps
    (N, views, C, H, W) before the backbone's last ``tail`` parts (:func:`backbone_output`).
    """
    preprocessor = ImagePreprocessor(cfg)
    runtime = getattr(backbone, "identity", "float32") if pooling == "avg" and not tail else "float32"
    per_view = []
    for view in range(views):
        view_tta = tta if view == 0 else "none"
        cache = FeatureCache(root, cache_key(cfg, preprocessor, weights=weights, view=view, pooling=pooling,
                                             runtime=runtime, tta=view_tta, tail=tail))
        todo = cache.missing(paths)
        if todo:
            start = time.perf_counter()
            crop = "the centre crop" if view == 0 else f"random crop {view} of {views - 1}"
            crop += f" ({view_tta}: its views averaged)" if view_tta != "none" else ""
            feats = compute_features(backbone, preprocessor, todo, view=view, batch_size=batch_size,
                                     num_workers=num_workers, device=device, pooling=pooling, tta=view_tta,
                                     tail=tail, desc=f"caching {crop} for {len(todo)} photos")
            elapsed = time.perf_counter() - start
            logger.info("cached %d image features (view %d) in %.1fs: %.1f images/s -> %s", len(todo), view,
                        elapsed, len(todo) / max(elapsed, 1e-9), cache.folder)
            cache.add(todo, feats)
        per_view.append(cache.get(paths))
    return np.stack(per_view, axis=1)
