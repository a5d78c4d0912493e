"""The caption model (backbone + decoder + vocabulary + traits) and its checkpoint directory, no pickle.

Layout::

    model.safetensors   backbone and decoder weights
    config.yaml         the resolved experiment config (model.family says which decoder)
    traits.json         the trait vocabulary (slot 0 = no personality)
    vocab.json          the caption vocabulary
    meta.json           format, family, fingerprint, sha256 of every file, metrics

Written in a staging folder and published atomically, as retrieval checkpoints are
(:func:`transresnet.checkpoint.publish_dir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import save_model
from torch import nn

from transresnet.checkpoint import (
    CONFIG,
    META,
    TRAITS,
    WEIGHTS,
    CheckpointError,
    clean_leftovers,
    load_weights,
    publish_dir,
    read_meta,
    staging_dir,
    state_dict_digest,
    verify_checksums,
)
from transresnet.config import DecodingConfig, ExperimentConfig, dump_config
from transresnet.encoders import create_backbone
from transresnet.features import backbone_output
from transresnet.files import sha256_file
from transresnet.generation.decoding import decode
from transresnet.generation.models import CaptionDecoder, create_decoder
from transresnet.generation.vocab import Vocabulary
from transresnet.runtime import utc_timestamp
from transresnet.traits import TraitVocab

logger = logging.getLogger(__name__)

VOCAB = "vocab.json"
GENERATOR_FORMAT = 1
REQUIRED = (WEIGHTS, CONFIG, TRAITS, VOCAB)


class CaptionModel(nn.Module):
    """A frozen timm backbone's grid features -> a caption decoder, with its vocabulary and traits."""

    def __init__(self, config: ExperimentConfig, vocab: Vocabulary, traits: TraitVocab, *,
                 load_backbone_weights: bool = True) -> None:
        super().__init__()
        self.config = config
        self.vocab = vocab
        self.traits = traits
        self.backbone = create_backbone(config.model.image, load_weights=load_backbone_weights)
        self.backbone.requires_grad_(False)
        self.use_traits = config.model.personality.enabled
        self.decoder: CaptionDecoder = create_decoder(
            config.model.family, config.model.decoder, vocab_size=len(vocab),
            grid_dim=int(self.backbone.num_features), trait_slots=len(traits) if self.use_traits else 0)

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def trait_slots(self, traits: Sequence[str | None]) -> list[int]:
        """Slots of the traits (unknown ones raise UnknownTraitError); all 0 without a personality input."""
        slots = self.traits.lookup_many(traits)
        return slots if self.use_traits else [0] * len(slots)

    @torch.no_grad()
    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        """Grid features (B, cells, F) of preprocessed images."""
        self.backbone.eval()
        return backbone_output(self.backbone, pixels.to(self.device), "grid").float()

    def generate(self, grid: torch.Tensor, trait_ids: Sequence[int], options: DecodingConfig | None = None, *,
                 generator: torch.Generator | None = None) -> list[str]:
        """One caption per row of grid features and trait slot."""
        options = options or self.config.model.decoder.decoding
        traits = torch.as_tensor(list(trait_ids), dtype=torch.long, device=self.device)
        ids = decode(self.decoder, grid.to(self.device), traits, options, generator=generator)
        return [self.vocab.decode(row) for row in ids]


@dataclass
class GeneratorCheckpoint:
    model: CaptionModel
    config: ExperimentConfig
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)


def fingerprint(model: CaptionModel) -> str:
    digest = hashlib.sha256(model.vocab.to_json().encode() + model.traits.to_json().encode())
    return state_dict_digest(model, digest).hexdigest()[:32]


def write_generator(model: CaptionModel, folder: Path, *, metrics: dict[str, Any] | None = None,
                    extra: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Write the checkpoint's files into the empty ``folder``; ``extra(folder)`` adds more (a training state),
    checksummed in ``meta.json`` with the rest."""
    save_model(model, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(dump_config(model.config))
    (folder / TRAITS).write_text(model.traits.to_json())
    (folder / VOCAB).write_text(model.vocab.to_json())
    if extra is not None:
        extra(folder)
    meta = {"format_version": 1, "kind": "generator", "generator_format": GENERATOR_FORMAT,
            "family": model.config.model.family, "fingerprint": fingerprint(model),
            "embed_dim": model.config.model.decoder.hidden_dim, "created": utc_timestamp(), "metrics": metrics or {},
            "files": {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != META}}
    (folder / META).write_text(json.dumps(meta, indent=1))
    return meta


def save_generator(model: CaptionModel, out_dir: str | Path, *, metrics: dict[str, Any] | None = None) -> Path:
    """Write to a staging folder beside ``out_dir``, then publish it in one atomic step."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out_dir)
    staging = staging_dir(out_dir)
    try:
        write_generator(model, staging, metrics=metrics)
        publish_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def is_generator_checkpoint(path: str | Path) -> bool:
    return (Path(path) / VOCAB).is_file()


def load_generator(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> GeneratorCheckpoint:
    """Rebuild a caption model from its checkpoint directory, in eval mode, on ``device``."""
    path = Path(path)
    meta = read_meta(path, required_files=REQUIRED)
    if meta.get("kind") != "generator":
        raise CheckpointError(f"{path} is not a caption-generator checkpoint (meta.json kind {meta.get('kind')!r})")
    if verify:
        verify_checksums(path, meta)
    try:
        config = ExperimentConfig.model_validate(yaml.safe_load((path / CONFIG).read_text()))
        vocab = Vocabulary.from_json((path / VOCAB).read_text())
        traits = TraitVocab.from_json((path / TRAITS).read_text())
    except (ValidationError, yaml.YAMLError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from None
    model = CaptionModel(config, vocab, traits, load_backbone_weights=False)
    load_weights(model, path / WEIGHTS, against=f"the model its {path / CONFIG} builds")
    model.to(device).eval()
    logger.info("loaded %s caption generator %s", config.model.family, path)
    return GeneratorCheckpoint(model=model, config=config, path=path, meta=meta)
