"""One loaded (checkpoint, index) pair. Immutable: a reload builds a new one and swaps the reference."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from transresnet.options import ImagePrecision, IndexPlacement

if TYPE_CHECKING:
    from transresnet.index import CaptionIndex

    from transresnet.checkpoint import Checkpoint
    from transresnet.generation.consensus import ConsensusRanker
    from transresnet.images import ImagePreprocessor
    from transresnet.traits import TraitVocab

logger = logging.getLogger(__name__)


# What the shipped training setups' photos are, by config name, so a user knows what to send.
_FLICKR8K = "Flickr8k photos of people, animals, outdoor scenes"
TRAINED_ON = {
    "synthetic": "synthetic drawn shapes: send coloured shapes, not photos",
    "flickr8k_voices": f"{_FLICKR8K}, voiced captions (template voices, a proxy for Personality-Captions)",
    "flickr8k": f"{_FLICKR8K}, human captions",
    "flickr8k_fast": f"{_FLICKR8K}, human captions",
    "personality_captions": "YFCC100M photos of everyday scenes, Personality-Captions' human captions in "
                            "215 personalities",
}


def trained_on(checkpoint: Checkpoint) -> str | None:
    """What kind of photos and captions the model learned from; None for a setup of unknown data."""
    config = checkpoint.config
    if config.name in TRAINED_ON:
        return TRAINED_ON[config.name]
    return TRAINED_ON["synthetic"] if config.data.synthesize else None  # a renamed synthetic setup


def describe_model(checkpoint: Checkpoint) -> str:
    """'flickr8k_voices: Flickr8k photos of ..., voiced captions (...); tf_efficientnet_lite2 image encoder,
    trained on captions.csv in voices/, 10 personalities'."""
    config = checkpoint.config
    views = f" with {config.model.image.tta} test-time augmentation" if config.model.image.tta != "none" else ""
    parts = [f"{config.model.image.backbone} image encoder{views}"]
    if config.data.train:
        train = Path(config.data.train)
        parts.append(f"trained on {train.name} in {train.parent.name or '.'}/")
    count = len(checkpoint.traits.names)
    parts.append(f"{count} personalities" if count else "no personalities")
    domain = trained_on(checkpoint)
    return f"{config.name}: " + (f"{domain}; " if domain else "") + ", ".join(parts)


@dataclass(frozen=True, eq=False)
class Bundle:
    checkpoint: Checkpoint
    index: CaptionIndex
    preprocessor: ImagePreprocessor
    loaded_at: float = field(default_factory=time.time)

    @property
    def traits(self) -> TraitVocab:
        return self.checkpoint.traits

    @property
    def model_info(self) -> dict[str, Any]:
        weights_sha = self.checkpoint.meta.get("files", {}).get("model.safetensors", "")
        return {"name": self.checkpoint.config.name, "version": (weights_sha or self.checkpoint.fingerprint)[:12],
                "fingerprint": self.checkpoint.fingerprint, "description": describe_model(self.checkpoint),
                "personalities": len(self.checkpoint.traits.names)}

    @property
    def index_info(self) -> dict[str, Any]:
        index_type = self.index.manifest.get("index", {}).get("type")
        return {"version": str(self.index.version), "size": len(self.index), "type": index_type,
                "placement": self.index.placement.to_dict()}

    @property
    def index_fallback(self) -> dict[str, Any] | None:
        """(wanted, serving, reason) when CURRENT was bad at load and another verified version is served."""
        fallback = self.index.fallback
        return None if fallback is None else fallback.to_dict()

    @property
    def image_encoder(self) -> dict[str, Any]:
        """The image runtime serving (chosen precision, why, per-candidate cosine and time)."""
        report = getattr(self.checkpoint.model.backbone, "report", None)
        return report.to_dict() if report is not None else {"chosen": "float32", "requested": "float32"}

    @cached_property
    def consensus(self) -> ConsensusRanker:
        """CIDEr-D agreement scorer on the document frequencies of this index's captions (consensus
        re-ranking). Built once per loaded index, at load time when a generator is served (``Resources``),
        so no request waits for it."""
        from transresnet.generation.consensus import ConsensusRanker

        start = time.perf_counter()
        ranker = ConsensusRanker(self.index.caption_texts())
        logger.info("consensus document frequencies over %d captions of index %s in %.1fs", len(self.index),
                    self.index.version, time.perf_counter() - start)
        return ranker

    @property
    def min_side(self) -> int:
        """Short side the preprocessor resizes to (large JPEGs may be decoded at reduced scale down to 2x it)."""
        return self.preprocessor.cfg.effective_resize


def prepare_images(checkpoint: Checkpoint, precision: ImagePrecision) -> None:
    """Install the image encoder runtime ``precision`` (checked against float32 on the checkpoint's held-out
    photos where they are on this machine, the ones GET /v1/samples offers, else on synthetic images)."""
    from transresnet.fusion import check_sample, folded_for_inference
    from transresnet.image_runtime import apply_image_precision, calibration_from_files, held_out_photos

    model = checkpoint.model
    # The frozen batch norms folded into the convolutions (1.2-1.5x per image, docs/results.md; checked
    # on a sample), and channels-last convolutions, which cost less per image at every batch size on CPU
    # (oneDNN) and GPU (cuDNN). Serving only: a folded backbone is never trained or saved.
    sample = check_sample(checkpoint.config.model.image.image_size).to(next(model.parameters()).device)
    model.backbone = folded_for_inference(model.backbone, sample).to(memory_format=torch.channels_last)
    if precision == "float32":
        return
    photos = held_out_photos(checkpoint.config.data)
    calibration = calibration_from_files(photos, checkpoint.config.model.image) if photos else None
    report = apply_image_precision(model, precision, calibration=calibration, checkpoint_dir=Path(checkpoint.path))
    logger.info("image encoder %s (asked: %s): %s", report.chosen, precision, report.reason)


def load_bundle(checkpoint_path: Path, index_path: Path, *, device: str = "auto", mmap: bool = False,
                checkpoint: Checkpoint | None = None, fallback: bool = False,
                placement: IndexPlacement = "auto", image_precision: ImagePrecision = "float32") -> Bundle:
    """Load (or reuse) the checkpoint, then the index checked against its fingerprint. Blocking.

    ``fallback``: when the index root's CURRENT names a version that fails verification, serve the newest
    version that verifies and fits the checkpoint (start-up only; a reload refuses a bad CURRENT instead).
    ``image_precision``: the image encoder runtime of a newly loaded checkpoint (:func:`prepare_images`); a
    reused checkpoint keeps the one it has."""
    from transresnet.index import load_index

    from transresnet.checkpoint import load_checkpoint
    from transresnet.devices import resolve_device
    from transresnet.images import ImagePreprocessor

    start = time.perf_counter()
    if checkpoint is None:
        checkpoint = load_checkpoint(checkpoint_path, device=resolve_device(device))
        prepare_images(checkpoint, image_precision)
    caption_index = load_index(index_path, checkpoint=checkpoint, mmap=mmap, fallback=fallback,
                               placement=placement)
    if len(caption_index) == 0:
        raise ValueError(f"index {caption_index.path} holds no captions; rebuild it with `transresnet index build`")
    bundle = Bundle(checkpoint, caption_index, ImagePreprocessor(checkpoint.config.model.image))
    logger.info("loaded checkpoint %s and index %s (version %s, %d captions) in %.1fs", checkpoint.path,
                caption_index.path, caption_index.version, len(caption_index), time.perf_counter() - start)
    return bundle
