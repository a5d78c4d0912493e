"""Several caption generators decoded as one: the members' next-word distributions averaged at every step.

The usual ensemble of captioning systems (e.g. Anderson et al. 2018's, self-critical.pytorch's
``AttEnsemble``): each member keeps its own context and recurrent state, and the step's log-probability is
``log(mean_i p_i(w))``. :class:`EnsembleDecoder` has the decoder interface (``prepare``, ``initial_state``,
``step``), so greedy, sampling and beam search drive it unchanged. Members must share the vocabulary, the
traits and the image features (backbone and preprocessing): they are seeds or variants of one config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transresnet.checkpoint import CheckpointError
from transresnet.generation.checkpoint import GeneratorCheckpoint, is_generator_checkpoint, load_generator
from transresnet.generation.models import CaptionDecoder, Context, State, teacher_forced


@dataclass
class EnsembleContext:
    """The members' contexts, expanded and reordered together."""

    members: list[Context]

    def index_select(self, index: torch.Tensor) -> EnsembleContext:
        return EnsembleContext([ctx.index_select(index) for ctx in self.members])


class EnsembleDecoder(nn.Module):
    """Decoders over the same grid features and vocabulary whose word distributions are averaged."""

    def __init__(self, decoders: Sequence[CaptionDecoder]) -> None:
        super().__init__()
        if len(decoders) < 2:
            raise ValueError("an ensemble needs at least two decoders")
        sizes = {d.vocab_size for d in decoders}
        if len(sizes) != 1:
            raise ValueError(f"ensemble members disagree on the vocabulary size: {sorted(sizes)}")
        self.members = nn.ModuleList(decoders)
        self.vocab_size = sizes.pop()
        self.family = "+".join(d.family for d in decoders)
        self._state_sizes: list[int] = []

    def prepare(self, grid: torch.Tensor, trait_ids: torch.Tensor) -> EnsembleContext:
        return EnsembleContext([d.prepare(grid, trait_ids) for d in self.members])

    def initial_state(self, ctx: EnsembleContext) -> State:
        states = [d.initial_state(c) for d, c in zip(self.members, ctx.members, strict=True)]
        self._state_sizes = [len(s) for s in states]
        return tuple(t for s in states for t in s)  # one flat tuple, so decoding can reorder it as any state

    def _split(self, state: State) -> list[State]:
        out, start = [], 0
        for size in self._state_sizes:
            out.append(state[start:start + size])
            start += size
        return out

    def forward(self, grid: torch.Tensor, trait_ids: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: the ensemble's next-word log-probabilities (B, L, V) after each of ``inputs``."""
        return teacher_forced(self, grid, trait_ids, inputs)

    def step(self, tokens: torch.Tensor, state: State, ctx: EnsembleContext) -> tuple[torch.Tensor, State]:
        """Log of the members' mean next-word probability (already normalised), and the members' states."""
        logps, states = [], []
        for decoder, member_state, member_ctx in zip(self.members, self._split(state), ctx.members, strict=True):
            logits, new_state = decoder.step(tokens, member_state, member_ctx)
            logps.append(torch.log_softmax(logits.float(), dim=-1))
            states.append(new_state)
        mean_logp = torch.logsumexp(torch.stack(logps), dim=0) - math.log(len(logps))
        return mean_logp, tuple(t for s in states for t in s)


def _mismatch(first: GeneratorCheckpoint, other: GeneratorCheckpoint) -> str | None:
    """What keeps ``other`` from decoding beside ``first``, or None."""
    if other.model.vocab.to_json() != first.model.vocab.to_json():
        return "a different caption vocabulary"
    if other.model.traits.to_json() != first.model.traits.to_json() or other.model.use_traits != first.model.use_traits:
        return "different traits"
    if other.config.model.image != first.config.model.image:
        return "a different image encoder (backbone or preprocessing), so other grid features"
    return None


def load_ensemble(paths: Sequence[str | Path], *, device: str | torch.device = "cpu") -> GeneratorCheckpoint:
    """One generator checkpoint, or several whose decoders are averaged (the first's backbone, vocabulary,
    traits and decoding settings serve them all)."""
    for path in paths:
        if (Path(path) / "meta.json").is_file() and not is_generator_checkpoint(path):
            raise CheckpointError(f"{path} is a retrieval checkpoint, not a caption generator: an ensemble takes "
                                  "generator checkpoints (a showtell, showatttell or updown run's best/)")
    checkpoints = [load_generator(p, device=device) for p in paths]
    first = checkpoints[0]
    if len(checkpoints) == 1:
        return first
    for other in checkpoints[1:]:
        problem = _mismatch(first, other)
        if problem:
            raise CheckpointError(f"{other.path} cannot join an ensemble with {first.path}: it has {problem}; "
                                  "ensemble seeds or variants of one config")
    first.model.decoder = EnsembleDecoder([c.model.decoder for c in checkpoints]).to(device).eval()
    first.meta = {**first.meta, "ensemble": [str(c.path) for c in checkpoints]}
    return first
