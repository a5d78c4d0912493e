"""Checkpoints: one directory that rebuilds a model exactly, with no pickle anywhere.

Layout::

    model.safetensors   all weights (backbone included, so loading needs no original weight files)
    config.yaml         the resolved experiment config
    traits.json         the trait vocabulary
    text/               tokenizer and transformer config, or the bag-of-words vocabulary
    meta.json           format version, text fingerprint, dimension, sha256 of every file, metrics

The *text fingerprint* hashes everything that determines caption vectors; a caption index records it
and refuses to serve with a checkpoint whose fingerprint differs.

A checkpoint is written into a staging directory beside its target (``.NAME.staging-...@host@pid``),
flushed to disk and then published in one atomic step: a rename when the target does not exist yet,
else an atomic exchange of the two directories (Linux ``renameat2(RENAME_EXCHANGE)``), so a reader or a
kill at any moment sees either the old checkpoint or the new one, never none and never half of one.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from transresnet.config import ExperimentConfig
from transresnet.files import (
    fsync_dir,
    fsync_tree,
    make_readable,
    owner_tag,
    remove_stale,
    sha256_file,
)
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
REQUIRED_FILES = (WEIGHTS, CONFIG, TRAITS)
REQUIRED_META = ("format_version", "fingerprint", "embed_dim", "files")
RETRAIN_HINT = "copy the checkpoint again or retrain it (`transresnet train --out DIR`, then use DIR/best)"


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


# ------------------------------------------------------------------------------- atomic file steps


def staging_dir(target: Path) -> Path:
    """A fresh hidden folder beside ``target`` to write into before publishing (see :func:`publish_dir`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.staging-{time.time_ns()}{owner_tag()}")
    staging.mkdir()
    staging.chmod(0o755)
    return staging


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_dirs(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def publish_dir(staging: Path, target: Path) -> None:
    """Make the fully written ``staging`` folder ``target`` in one atomic step (see the module doc)."""
    make_readable(staging)  # safetensors writes 0600: a server running as another user could not read it
    fsync_tree(staging)
    if not target.exists():
        os.rename(staging, target)
    elif exchange_dirs(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous version
    else:  # no atomic exchange here: two renames, and recover_dir() undoes a kill between them
        retired = target.with_name(f".{target.name}.old-{time.time_ns()}{owner_tag()}")
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    fsync_dir(target.parent)


def recover_dir(target: Path) -> None:
    """Put back the newest retired copy of ``target`` when a two-rename swap was cut off between renames."""
    if target.exists():
        return
    retired = sorted(target.parent.glob(f".{target.name}.old-*"))
    if retired:
        logger.warning("%s is missing after an interrupted swap: restoring it from %s", target, retired[-1].name)
        os.replace(retired[-1], target)
        fsync_dir(target.parent)


def clean_leftovers(target: Path) -> None:
    """Restore an interrupted swap of ``target`` and delete dead writers' staging and retired copies."""
    recover_dir(target)
    remove_stale(target.parent, f".{target.name}.")


# ------------------------------------------------------------------------------------------- save


def _file_checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != META
    }


def write_checkpoint(model: TransResNet, config: ExperimentConfig, folder: Path, *,
                     metrics: dict[str, Any] | None = None,
                     extra: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Write a checkpoint's files into the existing empty ``folder`` (no publishing); returns its meta.

    ``extra(folder)`` adds more files (a training state) before ``meta.json`` records every file's sha256,
    so one verification covers the whole unit.
    """
    save_model(model, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    (folder / TRAITS).write_text(model.traits.to_json())
    (folder / TEXT_ASSETS).mkdir()
    model.text.save_assets(folder / TEXT_ASSETS)
    if extra is not None:
        extra(folder)
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": text_fingerprint(model),
        "embed_dim": model.embed_dim,
        "created": utc_timestamp(),
        "metrics": metrics or {},
        "files": _file_checksums(folder),
    }
    (folder / META).write_text(json.dumps(meta, indent=1))
    return meta


def save_checkpoint(model: TransResNet, config: ExperimentConfig, out_dir: str | Path,
                    *, metrics: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint to a staging dir beside ``out_dir``, then publish it atomically."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out_dir)
    staging = staging_dir(out_dir)
    try:
        meta = write_checkpoint(model, config, staging, metrics=metrics)
        publish_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s (fingerprint %s)", out_dir, meta["fingerprint"])
    return out_dir


# ------------------------------------------------------------------------------------------- read


def read_meta(path: Path, *, required_files: tuple[str, ...] = REQUIRED_FILES) -> dict[str, Any]:
    """``meta.json`` of a checkpoint folder, with every expected entry present, or a CheckpointError."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} not found; train one with `transresnet train --out DIR` "
                              "and pass DIR/best")
    missing = [n for n in (*required_files, META) if not (path / n).exists()]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}; {RETRAIN_HINT}")
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / META} is corrupted ({err}); {RETRAIN_HINT}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META} does not hold a JSON object; {RETRAIN_HINT}")
    absent = [key for key in REQUIRED_META if key not in meta]
    if absent:
        raise CheckpointError(f"{path / META} has no {', '.join(repr(k) for k in absent)} entry (it was not "
                              f"written by save_checkpoint, or was edited); {RETRAIN_HINT}")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta['format_version']}, "
                              f"this version reads format {FORMAT_VERSION}")
    files = meta["files"]
    if not isinstance(files, dict):
        raise CheckpointError(f"{path / META}: 'files' must map file names to sha256 checksums; {RETRAIN_HINT}")
    unlisted = [n for n in required_files if n not in files]
    if unlisted:
        raise CheckpointError(f"{path / META} lists no checksum for {', '.join(unlisted)}, so the checkpoint "
                              f"cannot be verified; {RETRAIN_HINT}")
    return meta


def verify_checksums(path: Path, meta: dict[str, Any]) -> None:
    for name, expected in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name} (listed in {META}); {RETRAIN_HINT}")
        if sha256_file(file) != expected:
            raise CheckpointError(f"checkpoint file {file} is corrupted (checksum mismatch: truncated or "
                                  f"changed since it was saved); {RETRAIN_HINT}")


def _read_config(path: Path) -> ExperimentConfig:
    file = path / CONFIG
    try:
        return ExperimentConfig.model_validate(yaml.safe_load(file.read_text()))
    except yaml.YAMLError as err:
        raise CheckpointError(f"{file} is not valid YAML ({err}); {RETRAIN_HINT}") from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise CheckpointError(f"{file} is not a valid config ({problems}); fix those keys or {RETRAIN_HINT}") from None


def _read_traits(path: Path) -> TraitVocab:
    file = path / TRAITS
    try:
        return TraitVocab.from_json(file.read_text())
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file} is not a valid trait vocabulary ({err}); {RETRAIN_HINT}") from None


def _check_text_assets(path: Path, config: ExperimentConfig) -> Path:
    """The ``text/`` folder must hold what rebuilds the text encoder; never fall back to a model hub."""
    folder = path / TEXT_ASSETS
    needed = ["config.json"] if config.model.text.kind == "transformer" else ["bow_vocab.json"]
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {path} has no {TEXT_ASSETS}/ folder ({folder}), which holds the "
                              f"tokenizer and text-encoder config; nothing is fetched from a model hub "
                              f"instead: {RETRAIN_HINT}")
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{folder} lacks {', '.join(missing)}; {RETRAIN_HINT}")
    return folder


def _describe_mismatch(model: torch.nn.Module, file: Path) -> str:
    """Which tensors of a weights file are missing, unexpected or of the wrong shape for ``model``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(file), "pt") as handle:
        found = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118

    def listing(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    parts = []
    shapes = [f"{k} {list(found[k])} where the config builds {list(expected[k])}"
              for k in sorted(expected.keys() & found.keys()) if expected[k] != found[k]]
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) of another shape: {listing(shapes)}")
    missing = sorted(expected.keys() - found.keys())
    if missing:
        parts.append(f"{len(missing)} missing: {listing(missing)}")
    unexpected = sorted(found.keys() - expected.keys())
    if unexpected:
        parts.append(f"{len(unexpected)} not in the model: {listing(unexpected)}")
    return "; ".join(parts) or "unknown mismatch"


def load_weights(model: torch.nn.Module, file: Path, *, against: str = "this model") -> None:
    """Load a safetensors file strictly into ``model``; a damaged or ill-fitting file is a CheckpointError."""
    try:
        load_model(model, str(file), strict=True)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"weights file {file} cannot be read ({err}): it is truncated or damaged; "
                              f"{RETRAIN_HINT}") from None
    except RuntimeError:
        raise CheckpointError(f"weights in {file} do not fit {against}: {_describe_mismatch(model, file)}. "
                              "Load them with the config.yaml they were saved with, or retrain") from None


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Rebuild the model a checkpoint directory describes, in eval mode, on ``device``."""
    path = Path(path)
    meta = read_meta(path)
    if verify:
        verify_checksums(path, meta)
    config = _read_config(path)
    traits = _read_traits(path)
    text_assets = _check_text_assets(path, config)
    model = create_model(config.model, traits, text_assets=text_assets, load_weights=False)
    load_weights(model, path / WEIGHTS, against=f"the model its {path / CONFIG} builds")
    model.to(device).eval()
    fingerprint = text_fingerprint(model)
    if fingerprint != meta["fingerprint"]:
        raise CheckpointError(f"checkpoint {path}: text fingerprint {fingerprint} differs from the recorded "
                              f"{meta['fingerprint']}; the files do not belong together: {RETRAIN_HINT}")
    logger.info("loaded checkpoint %s (fingerprint %s)", path, fingerprint)
    return Checkpoint(model=model, config=config, path=path, fingerprint=fingerprint, meta=meta)
