"""Inputs of the caption generators: cached grid features, caption queries and teacher-forcing batches."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transresnet.checkpoint import state_dict_digest
from transresnet.data import CaptionRecord
from transresnet.features import cached_features, weights_identity
from transresnet.generation.checkpoint import CaptionModel
from transresnet.generation.vocab import BOS_ID, EOS_ID, PAD_ID, Vocabulary


def backbone_identity(model: CaptionModel) -> str:
    """The feature-cache weights key: the weights file's (shared with training) or the weights themselves."""
    cfg = model.config.model.image
    if cfg.pretrained or (cfg.weights and Path(cfg.weights).is_file()):
        return weights_identity(cfg)
    return "checkpoint-backbone:" + state_dict_digest(model.backbone).hexdigest()[:32]


def grid_features(model: CaptionModel, paths: Sequence[Path], *, root: str | Path, batch_size: int = 64,
                  num_workers: int = 0, identity: str | None = None, views: int = 1) -> torch.Tensor:
    """Grid features (N, cells, F) of frozen-backbone images, through the on-disk feature cache; with
    ``views`` > 1, (N, views, cells, F): the centre crop, then the random crops training draws from."""
    features = cached_features(model.backbone, model.config.model.image, paths, root=root,
                               weights=identity or backbone_identity(model), views=views, batch_size=batch_size,
                               num_workers=num_workers, device=model.device, pooling="grid")
    return torch.from_numpy(np.ascontiguousarray(features[:, 0] if views == 1 else features))


@dataclass(frozen=True)
class Query:
    """One image asked for in one voice, with every reference caption it has."""

    image_path: Path
    image_id: str
    trait: str | None
    references: tuple[str, ...]


def group_queries(records: Sequence[CaptionRecord]) -> list[Query]:
    """Distinct (image, personality) pairs in first-seen order, each with its gold captions."""
    refs: dict[tuple[Path, str | None], list[str]] = defaultdict(list)
    ids: dict[Path, str] = {}
    for r in records:
        refs[(r.image_path, r.personality)] += [r.caption, *r.additional_captions]
        ids[r.image_path] = r.image_id
    return [Query(path, ids[path], trait, tuple(dict.fromkeys(caps))) for (path, trait), caps in refs.items()]


@dataclass
class Example:
    image_row: int
    trait: int
    tokens: list[int]


def build_examples(records: Sequence[CaptionRecord], image_rows: dict[Path, int], slots: Sequence[int],
                   vocab: Vocabulary, max_tokens: int) -> list[Example]:
    return [Example(image_rows[r.image_path], slot, vocab.encode(r.caption, max_tokens))
            for r, slot in zip(records, slots, strict=True)]


def teacher_forcing(batch: Sequence[Example], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``<bos> w1 .. wn`` and targets ``w1 .. wn <eos>``, padded with <pad> (B, L)."""
    return shifted_tokens([e.tokens for e in batch], device)


def shifted_tokens(captions: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word ids per caption -> teacher-forcing inputs and targets (see :func:`teacher_forcing`)."""
    length = max(len(c) for c in captions) + 1
    inputs = torch.full((len(captions), length), PAD_ID, dtype=torch.long)
    targets = torch.full((len(captions), length), PAD_ID, dtype=torch.long)
    for i, words in enumerate(captions):
        inputs[i, : len(words) + 1] = torch.tensor([BOS_ID, *words])
        targets[i, : len(words) + 1] = torch.tensor([*words, EOS_ID])
    return inputs.to(device), targets.to(device)


# ------------------------------------------------------------------------------ language-model pretraining


def image_keys(image_id: str) -> set[str]:
    """The names an image id matches by: its file name and its stem, lower case (``a/B.jpg#2`` -> b.jpg, b).

    Pools write ids differently (``x.jpg``, ``images/x.jpg``, Flickr's ``x.jpg#0``, a bare stem), so held-out
    images are matched by both.
    """
    name = Path(image_id.split("#", 1)[0].strip().replace("\\", "/")).name.lower()
    return {name, Path(name).stem} - {""}


def exclude_images(records: Sequence[CaptionRecord], held_out: Sequence[CaptionRecord]
                   ) -> tuple[list[CaptionRecord], int]:
    """``records`` without those of any image in ``held_out`` (by file name or stem), and how many went."""
    banned = set().union(*(image_keys(r.image_id) for r in held_out)) if held_out else set()
    kept = [r for r in records if not image_keys(r.image_id) & banned]
    return kept, len(records) - len(kept)


def token_stream(captions: Sequence[str], vocab: Vocabulary) -> torch.Tensor:
    """Captions as one stream ``<bos> w1 .. wn <eos> <bos> ...`` of token ids (1-D, long)."""
    ids: list[int] = []
    for caption in captions:
        ids += [BOS_ID, *vocab.encode(caption), EOS_ID]
    return torch.tensor(ids, dtype=torch.long)


def parallel_streams(stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A 1-D stream cut into ``batch_size`` contiguous rows (B, N // B); the remainder is dropped."""
    width = stream.numel() // batch_size
    if width < 2:
        raise ValueError(f"a stream of {stream.numel()} tokens is too short for {batch_size} parallel streams of "
                         "at least 2 tokens; lower train.pretrain.batch_size or give more captions")
    return stream[: width * batch_size].view(batch_size, width)


def bptt_chunks(streams: torch.Tensor, bptt: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) windows of ``bptt`` steps along the rows; targets are the inputs shifted by one."""
    last = streams.shape[1] - 1
    return [(streams[:, i:i + min(bptt, last - i)], streams[:, i + 1:i + 1 + min(bptt, last - i)])
            for i in range(0, last, bptt)]
