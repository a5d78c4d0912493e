"""The choice sets of every option (index types, precisions, devices, protocols, trait modes), defined once.

Config models, pydantic option models and argparse all take their choices from these ``Literal`` types;
:func:`add_arguments` turns a pydantic options model into argparse flags and :func:`to_flags` turns an
options instance back into the flags that reproduce it (e.g. the rebuild command in an index error).
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

IndexType = Literal["flat", "ivf", "hnsw", "ivfpq"]
BuildIndexType = Literal["flat", "ivf", "hnsw", "ivfpq", "auto"]
Precision = Literal["auto", "float32", "bfloat16", "float16", "openvino_bf16", "int8"]
"""How captions are encoded (:mod:`transresnet.encode`); openvino_bf16 is the text transformer in OpenVINO in
bfloat16 (CPUs with native bfloat16), int8 the ONNX Runtime export dynamically quantised."""
ImagePrecision = Literal["auto", "float32", "channels_last", "bfloat16", "compile", "onnx", "openvino", "openvino_bf16",
                         "int8"]
"""How the image backbone runs (:mod:`transresnet.image_runtime`): the caption side's names where they mean the
same (float32, bfloat16, openvino_bf16, int8, auto), plus the float32 runtimes channels_last, compile
(torch.compile), onnx (ONNX Runtime) and openvino."""
BuildEngine = Literal["local", "ray"]
Device = Literal["auto", "cpu", "cuda"]
IndexPlacement = Literal["auto", "cpu", "shard", "replicate"]
"""Where a loaded caption index is searched: auto = the GPU(s) FAISS sees (sharded over several), else CPU."""
Protocol = Literal["candidates", "candidates500", "pool", "generate"]
TraitMode = Literal["given", "shuffled", "none"]
ConsensusCandidates = Literal["generated", "hybrid"]
"""What consensus re-ranking chooses from: the generator's beams, or the beams and the retrieved neighbours."""
ImageTTA = Literal["none", "flip"]
"""Test-time views of a photo whose pooled backbone features are averaged: the centre crop alone, or the
centre crop and its mirror image (``model.image.tta``, :func:`transresnet.features.pooled_features`)."""


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` type, e.g. ``choices(Device) == ("auto", "cpu", "cuda")``."""
    return tuple(get_args(literal))


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _flag(name: str, renames: dict[str, str]) -> str:
    return renames.get(name, "--" + name.replace("_", "-"))


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], *, renames: dict[str, str] | None = None,
                  exclude: tuple[str, ...] = (), required: tuple[str, ...] = ()) -> None:
    """One argparse flag per field of ``model``: type, choices, default and help come from the field.

    Fields the model requires are required flags, and so are the names in ``required``. A flag left out is
    absent from the parsed namespace (``argparse.SUPPRESS``), so the model supplies its default and its
    ``model_fields_set`` holds exactly the flags the user gave, even one given at its default value.
    """
    renames = renames or {}
    hints = typing.get_type_hints(model)
    for name, info in model.model_fields.items():
        if name in exclude:
            continue
        annotation = _strip_optional(hints[name])
        help_text = info.description or ""
        kwargs: dict[str, Any] = {"dest": name}
        if info.is_required() or name in required:
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS
            if info.default is not None and annotation is not bool:
                help_text += f" (default: {info.default})"
        kwargs["help"] = help_text.strip()
        if annotation is bool:
            kwargs["action"] = "store_true"
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = choices(annotation)
        elif annotation in (int, float, str, Path):
            kwargs["type"] = annotation
            kwargs["metavar"] = name.upper()
        elif get_origin(annotation) is list:
            kwargs["type"], kwargs["nargs"], kwargs["metavar"] = get_args(annotation)[0], "+", name.upper()
        parser.add_argument(_flag(name, renames), **kwargs)


def from_namespace(model: type[BaseModel], args: argparse.Namespace, **extra: Any) -> Any:
    """The options model validated from the parsed flags (only the model's own fields are read)."""
    values = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    return model.model_validate({**values, **extra})


def to_flags(options: BaseModel, *, renames: dict[str, str] | None = None, always: tuple[str, ...] = (),
             exclude: tuple[str, ...] = ()) -> list[str]:
    """The command-line flags that reproduce ``options`` (fields at their defaults are left out)."""
    renames = renames or {}
    flags: list[str] = []
    for name, info in type(options).model_fields.items():
        value = getattr(options, name)
        if name in exclude or (value == info.default and name not in always) or value is None:
            continue
        if value is True:
            flags.append(_flag(name, renames))
        elif isinstance(value, list):
            flags += [_flag(name, renames), *map(str, value)]
        elif value is not False:
            flags += [_flag(name, renames), str(value)]
    return flags


class EvalOptions(BaseModel):
    """Everything one evaluation needs: the one definition of the `transresnet eval` flags."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: Path = Field(description="checkpoint directory, e.g. runs/flickr8k/best")
    data: Path = Field(description="CSV, Personality-Captions JSON or Karpathy dataset.json")
    protocol: Protocol = Field("pool", description="candidates: each example's own 100 candidates (500 with 5 "
                               "golds: candidates500); pool: every caption of the split, both directions, exact "
                               "and through an index; generate: a caption generator's captions of every (image, "
                               "trait) of the split, BLEU / ROUGE-L / CIDEr-D")
    split: str | None = Field(None, description="split to keep (CSV, Karpathy), e.g. val or test")
    image_dir: Path | None = Field(None, description="image folder when not the format's default")
    out: Path | None = Field(None, description="output folder: eval.json, eval.md, recall_at_k.png")
    index: Path | None = Field(None, description="pool: a published INDEX_ROOT to measure against exact search")
    index_type: IndexType = Field("ivf", description="pool without --index: the index type built over the "
                                  "split's captions")
    traits: TraitMode = Field("given", description="personality per query: as given, shuffled across queries, "
                              "or withheld")
    feature_cache: Path | None = Field(None, description="feature cache root (default: the checkpoint config's)")
    batch_size: int = Field(256, ge=1, description="queries and captions per encoder batch")
    precision: Precision = Field("float32", description="caption encoder precision")
    image_precision: ImagePrecision = Field("float32", description="image encoder runtime: float32, channels_last, "
                                            "bfloat16, compile, onnx, int8 (each checked against float32 on "
                                            "calibration photos), or auto (the fastest that passes)")
    recall_target: float = Field(0.95, gt=0.0, le=1.0,
                                 description="recall@10 against exact search the approximate index is tuned to")
    device: Device = Field("auto", description="where the model runs")
    seed: int = Field(0, description="seed of shuffled traits and index training samples")
    beam_size: int | None = Field(None, ge=1, le=64, description="generate: beam size (default: the checkpoint "
                                  "config's decoding)")
    tta: ImageTTA | None = Field(None, description="test-time views averaged per photo: none (the centre crop) or "
                                 "flip (and its mirror); default: the checkpoint config's model.image.tta")
    ensemble: list[Path] | None = Field(None, description="generate: more generator checkpoints (seeds of the same "
                                        "config) decoded with --checkpoint as one, their next-word probabilities "
                                        "averaged at every step")
    consensus: Path | None = Field(None, description="generate: a retrieval checkpoint whose nearest captions in "
                                   "--consensus-pool re-rank the beams by CIDEr-D agreement (Devlin et al. 2015)")
    consensus_pool: Path | None = Field(None, description="generate with --consensus: the caption pool (CSV) to find "
                                        "neighbours in; captions of the evaluated photos are left out")
    consensus_k: int = Field(10, ge=1, le=100, description="generate with --consensus: neighbour captions per photo")
    consensus_candidates: ConsensusCandidates = Field("generated", description="generate with --consensus: rank "
                                                      "the beams alone (generated) or the beams and the neighbours "
                                                      "(hybrid)")

    @model_validator(mode="after")
    def _index_needs_pool(self) -> EvalOptions:
        if self.index is not None and self.protocol != "pool":
            raise ValueError("--index only applies to the pool protocol (candidate lists are scored exactly)")
        if (self.consensus is None) != (self.consensus_pool is None):
            raise ValueError("--consensus and --consensus-pool go together: a retrieval checkpoint and the caption "
                             "pool it finds neighbours in")
        if self.consensus is not None and self.protocol != "generate":
            raise ValueError("--consensus applies to the generate protocol (it re-ranks generated captions)")
        if self.ensemble and self.protocol != "generate":
            raise ValueError("--ensemble applies to the generate protocol (it averages caption generators)")
        if self.tta is not None and self.protocol == "generate":
            raise ValueError("--tta applies to retrieval (the candidates and pool protocols): caption generators "
                             "read grid features, which are never averaged over views")
        return self
