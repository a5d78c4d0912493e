"""Checkpoints: one directory that rebuilds a model exactly, with no pickle anywhere.

Layout::

    model.safetensors   all weights (backbone included, so loading needs no original weight files)
    config.yaml         the resolved experiment config
    traits.json         the trait vocabulary
    text/               tokenizer and transformer config, or the bag-of-words vocabulary
    meta.json           format version, text fingerprint, dimension, sha256 of every file, metrics

The *text fingerprint* hashes everything that determines caption vectors; a caption index records it
and refuses to serve with a checkpoint whose fingerprint differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_model, save_model

from transresnet.config import ExperimentConfig
from transresnet.files import sha256_file
from transresnet.model import TransResNet, create_model
from transresnet.runtime import utc_timestamp
from transresnet.traits import TraitVocab

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TRAITS = "traits.json"
TEXT_ASSETS = "text"
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, corrupted or does not fit its config."""


@dataclass
class Checkpoint:
    model: TransResNet
    config: ExperimentConfig
    path: Path
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def traits(self) -> TraitVocab:
        return self.model.traits


def state_dict_digest(module: torch.nn.Module, digest: Any = None) -> Any:
    """A sha256 (or ``digest``, updated) over every tensor's name and float32 value, in name order."""
    digest = digest or hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest


def text_fingerprint(model: TransResNet) -> str:
    """Hash of the text-side weights, tokenizer identity, dimension and normalisation."""
    digest = hashlib.sha256()
    identity = {"encoder": model.text.identity(), "dim": model.embed_dim, "scoring": model.config.scoring}
    digest.update(json.dumps(identity, sort_keys=True).encode())
    return state_dict_digest(model.text, digest).hexdigest()[:32]


def _file_checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != META
    }


def save_checkpoint(model: TransResNet, config: ExperimentConfig, out_dir: str | Path,
                    *, metrics: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint to a sibling temp dir, then swap it in, so readers never see half of one."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)
    try:
        save_model(model, str(staging / WEIGHTS))
        (staging / CONFIG).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        (staging / TRAITS).write_text(model.traits.to_json())
        (staging / TEXT_ASSETS).mkdir()
        model.text.save_assets(staging / TEXT_ASSETS)
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": text_fingerprint(model),
            "embed_dim": model.embed_dim,
            "created": utc_timestamp(),
            "metrics": metrics or {},
            "files": _file_checksums(staging),
        }
        (staging / META).write_text(json.dumps(meta, indent=1))
        _swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s (fingerprint %s)", out_dir, meta["fingerprint"])
    return out_dir


def _swap_in(staging: Path, target: Path) -> None:
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} not found; train one with `transresnet train --out DIR` "
                              "and pass DIR/best")
    missing = [n for n in (WEIGHTS, CONFIG, TRAITS, META) if not (path / n).exists()]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / META} is corrupted ({err}); re-save or retrain the checkpoint") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format_version')}, "
                              f"this version reads format {FORMAT_VERSION}")
    return meta


def verify_checksums(path: Path, meta: dict[str, Any]) -> None:
    for name, expected in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if sha256_file(file) != expected:
            raise CheckpointError(f"checkpoint file {file} is corrupted (checksum mismatch); "
                                  "copy it again or retrain")


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Rebuild the model a checkpoint directory describes, in eval mode, on ``device``."""
    path = Path(path)
    meta = _read_meta(path)
    if verify:
        verify_checksums(path, meta)
    config = ExperimentConfig.model_validate(yaml.safe_load((path / CONFIG).read_text()))
    traits = TraitVocab.from_json((path / TRAITS).read_text())
    model = create_model(config.model, traits, text_assets=path / TEXT_ASSETS, load_weights=False)
    try:
        load_model(model, str(path / WEIGHTS), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"weights in {path / WEIGHTS} do not match its config.yaml: "
                              f"{str(err).splitlines()[0][:300]}") from None
    model.to(device).eval()
    fingerprint = text_fingerprint(model)
    if fingerprint != meta["fingerprint"]:
        raise CheckpointError(f"checkpoint {path}: text fingerprint {fingerprint} differs from the recorded "
                              f"{meta['fingerprint']}; the files do not belong together")
    logger.info("loaded checkpoint %s (fingerprint %s)", path, fingerprint)
    return Checkpoint(model=model, config=config, path=path, fingerprint=fingerprint, meta=meta)
