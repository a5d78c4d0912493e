"""Self-critical sequence training (Rennie et al. 2017): REINFORCE on a caption metric, with a baseline.

Captions are sampled from the decoder's own distribution under the decoding rules the served decoder obeys
(:func:`transresnet.generation.decoding.restrict`), rewarded with their CIDEr-D against the query's
references (:class:`transresnet.generation.metrics.CiderD`, document frequencies from the training
references), and each sample's log-probability is pushed up by how much its reward beats a baseline: the
mean reward of the other samples of the same query (Luo 2020, "A better variant of self-critical sequence
training") or the reward of the greedy caption (Rennie et al.). The trainer (:mod:`.train`) runs it as a
phase after cross entropy.

The candidates are either sampled (the policy gradient proper) or the query's best beams, re-scored by
teacher forcing for the gradient, as the Meshed-Memory Transformer (Cornia et al. 2020) and X-LAN train:
a model trained with label smoothing spreads so much mass over rare words that its samples score a
quarter of its greedy captions' CIDEr-D, and pushing those around leaves the beams it decodes with behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from transresnet.config import DecodingConfig
from transresnet.generation.data import shifted_tokens
from transresnet.generation.decoding import beam_search, restrict
from transresnet.generation.models import CaptionDecoder
from transresnet.generation.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID


@dataclass
class Samples:
    tokens: list[list[int]]
    """Word ids per row, without <bos> and <eos>."""
    logprob: torch.Tensor
    """Sum of each row's token log-probabilities, <eos> included (R,), with gradient."""
    lengths: torch.Tensor
    """Tokens each row scored, <eos> included (R,)."""


def sample_with_logprobs(decoder: CaptionDecoder, grid: torch.Tensor, trait_ids: torch.Tensor,
                         options: DecodingConfig, generator: torch.Generator | None = None) -> Samples:
    """One caption per row drawn from the decoder (in whatever mode it is: dropout on while training), with
    the log-probabilities of the drawn tokens kept for the gradient. Temperature 1, no top-k / top-p: the
    policy gradient needs the model's own distribution (restricted and renormalised by the decoding rules)."""
    ctx = decoder.prepare(grid, trait_ids)
    state = decoder.initial_state(ctx)
    rows = grid.shape[0]
    histories: list[list[int]] = [[] for _ in range(rows)]
    alive = [True] * rows
    tokens = torch.full((rows,), BOS_ID, dtype=torch.long, device=grid.device)
    total = torch.zeros(rows, device=grid.device)
    lengths = torch.zeros(rows, device=grid.device)
    for step in range(options.max_length + 1):
        logits, state = decoder.step(tokens, state, ctx)
        logp = torch.log_softmax(restrict(logits.float(), step, histories, options), dim=-1)
        with torch.no_grad():
            chosen = torch.multinomial(logp.exp().cpu(), 1, generator=generator).squeeze(1).to(grid.device)
        scored = torch.tensor(alive, device=grid.device)  # rows still writing; their token counts
        picked = logp.gather(1, chosen.unsqueeze(1)).squeeze(1)
        total = total + torch.where(scored, picked, torch.zeros_like(picked))
        lengths = lengths + scored.float()
        for row, token in enumerate(chosen.tolist()):
            if not alive[row]:
                continue
            if token == EOS_ID:
                alive[row] = False
            else:
                histories[row].append(token)
        if not any(alive):
            break
        tokens = chosen.masked_fill(~torch.tensor(alive, device=grid.device), PAD_ID)
    return Samples(histories, total, lengths)


@torch.no_grad()
def beam_candidates(decoder: CaptionDecoder, grid: torch.Tensor, trait_ids: torch.Tensor, options: DecodingConfig,
                    width: int) -> list[list[list[int]]]:
    """The ``width`` best beams per row (beam search of that width, eval mode), as word ids."""
    beams = beam_search(decoder, grid, trait_ids, options.model_copy(update={"beam_size": width}), n_best=width)
    return [[h.tokens for h in hyps] for hyps in beams]


def teacher_forced_logprobs(decoder: CaptionDecoder, grid: torch.Tensor, trait_ids: torch.Tensor,
                            captions: Sequence[Sequence[int]]) -> Samples:
    """The captions (word ids, one per row) scored by the decoder in its current mode, with gradient: the
    sum of the log-probabilities of their words and <eos> (special tokens masked, as decoding never emits
    them)."""
    inputs, targets = shifted_tokens(captions, grid.device)
    logits = decoder(grid, trait_ids, inputs).float()
    logits = logits.index_fill(-1, torch.tensor([PAD_ID, BOS_ID, UNK_ID], device=grid.device), float("-inf"))
    picked = logits.log_softmax(-1).gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    scored = targets != PAD_ID
    logprob = torch.where(scored, picked, torch.zeros_like(picked)).sum(1)
    return Samples([list(c) for c in captions], logprob, scored.sum(1).float())


def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """Each sample's baseline: the mean reward of the other samples of its query (rewards: Q x n, n >= 2)."""
    n = rewards.shape[1]
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (n - 1)


def policy_gradient_loss(samples: Samples, advantage: torch.Tensor) -> torch.Tensor:
    """REINFORCE: minus the advantage-weighted log-probability, per token scored (as in self-critical.pytorch)."""
    return -(advantage.detach() * samples.logprob).sum() / samples.lengths.sum().clamp(min=1)


def repeat_rows(values: Sequence[int], times: int) -> list[int]:
    """``[a, b]`` -> ``[a, a, .., b, b, ..]`` (each ``times`` times): a query's samples stay together."""
    return [v for v in values for _ in range(times)]
