"""Decoding a caption decoder: greedy, sampling (temperature, top-k, top-p) and beam search.

All three run batched over rows (one row = one image with one trait) on whatever device the decoder is
on, and share the same restrictions on the next token (:func:`restrict`): never <pad>, <bos> or <unk>;
<eos> only after ``min_length`` words and forced after ``max_length``; optionally no repeated n-gram.

Beam search keeps ``beam_size`` unfinished hypotheses per row and moves every hypothesis that ends in
<eos> (within the top ``2 * beam_size`` candidates of a step) to that row's finished list, scored by the
length penalty (``none``: sum of log-probabilities; ``avg``: its mean per token; ``wu``: divided by
``((5 + length) / 6) ** alpha``, Wu et al. 2016; length counts <eos>). A row stops once its
``n_best``-th finished score is at least the best any unfinished hypothesis could still reach
(log-probabilities only fall, penalties only grow, so ``score / penalty(max_length + 1)`` bounds it):
with a beam wide enough to hold every prefix, the result is the exhaustive search's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from transresnet.config import DecodingConfig
from transresnet.generation.models import CaptionDecoder, Context, State
from transresnet.generation.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transresnet.runtime import eval_mode

NEG_INF = float("-inf")


@dataclass
class DecodeStats:
    """What a decode cost, for callers that report it (the service's decode-step histogram)."""

    steps: int = 0
    """Decoder steps run (one per generated position, over the whole batch)."""
    rows: int = 0
    """Rows decoded (beam search: hypotheses per step = rows x beam size)."""


@dataclass
class Hypothesis:
    tokens: list[int]
    """Word ids, without <bos> and <eos>."""
    score: float
    """Log-probability under the length penalty (what beams are ranked by)."""
    logprob: float
    """Sum of log-probabilities, <eos> included."""


def length_penalty(length: int, kind: str, alpha: float) -> float:
    if kind == "avg":
        return float(length)
    if kind == "wu":
        return ((5.0 + length) / 6.0) ** alpha
    return 1.0


def penalized(logprob: float, length: int, options: DecodingConfig) -> float:
    """A finished caption's score: ``logprob`` (``length`` tokens, <eos> included) under the length penalty."""
    return logprob / length_penalty(length, options.length_penalty, options.alpha)


def blocked_ngrams(history: Sequence[int], n: int) -> set[int]:
    """Tokens that would repeat an n-gram of ``history`` if appended to it."""
    if n <= 0 or len(history) < n - 1:
        return set()
    prefix = tuple(history[len(history) - n + 1:]) if n > 1 else ()
    return {history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i:i + n - 1]) == prefix}


def restrict(logp: torch.Tensor, step: int, histories: Sequence[Sequence[int]],
             options: DecodingConfig) -> torch.Tensor:
    """Apply the shared next-token rules to log-probabilities (R, V) at ``step`` words generated."""
    logp = logp.clone()
    logp[:, [PAD_ID, BOS_ID, UNK_ID]] = NEG_INF
    if step < options.min_length:
        logp[:, EOS_ID] = NEG_INF
    if step >= options.max_length:
        eos = logp[:, EOS_ID].clone()
        logp.fill_(NEG_INF)
        logp[:, EOS_ID] = eos
    if options.no_repeat_ngram:
        for row, history in enumerate(histories):
            banned = blocked_ngrams(history, options.no_repeat_ngram)
            if banned:
                logp[row, list(banned)] = NEG_INF
    return logp


def _start(decoder: CaptionDecoder, grid: torch.Tensor, trait_ids: torch.Tensor) -> tuple[Context, State]:
    ctx = decoder.prepare(grid, trait_ids)
    return ctx, decoder.initial_state(ctx)


def _step_logp(decoder: CaptionDecoder, tokens: torch.Tensor, state: State,
               ctx: Context) -> tuple[torch.Tensor, State]:
    logits, state = decoder.step(tokens, state, ctx)
    return torch.log_softmax(logits.float(), dim=-1), state


@torch.no_grad()
def greedy(decoder: CaptionDecoder, grid: torch.Tensor, trait_ids: torch.Tensor,
           options: DecodingConfig) -> list[list[int]]:
    """The most likely word at every step, per row."""
    return _sequential(decoder, grid, trait_ids, options, lambda logp: logp.argmax(dim=-1))


@torch.no_grad()
def sample(decoder: CaptionDecoder, grid: torch.Tensor, trait_ids: torch.Tensor, options: DecodingConfig, *,
           generator: torch.Generator | None = None) -> list[list[int]]:
    """Words drawn from the temperature-scaled distribution, cut to its top-k and top-p (nucleus) words."""

    def draw(logp: torch.Tensor) -> torch.Tensor:
        probs = filter_top(logp / options.temperature, options.top_k, options.top_p).softmax(dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logp.device)

    return _sequential(decoder, grid, trait_ids, options, draw)


def filter_top(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits outside the ``top_k`` largest and outside the smallest set with mass >= ``top_p`` -> -inf."""
    logits = logits.clone()
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits[logits < kth] = NEG_INF
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        mass_before = ordered.softmax(dim=-1).cumsum(dim=-1) - ordered.softmax(dim=-1)
        drop = mass_before >= top_p  # keep a word while the mass before it is under top_p (the first always)
        logits.scatter_(-1, order, ordered.masked_fill(drop, NEG_INF))
    return logits


def _sequential(decoder: CaptionDecoder, grid: torch.Tensor, trait_ids: torch.Tensor, options: DecodingConfig,
                choose) -> list[list[int]]:
    with eval_mode(decoder):
        ctx, state = _start(decoder, grid, trait_ids)
        rows = grid.shape[0]
        histories: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        tokens = torch.full((rows,), BOS_ID, dtype=torch.long, device=grid.device)
        for step in range(options.max_length + 1):
            logp, state = _step_logp(decoder, tokens, state, ctx)
            chosen = choose(restrict(logp, step, histories, options))
            for row, token in enumerate(chosen.tolist()):
                if done[row]:
                    continue
                if token == EOS_ID:
                    done[row] = True
                else:
                    histories[row].append(token)
            if all(done):
                break
            tokens = chosen.masked_fill(torch.as_tensor(done, device=chosen.device), PAD_ID)
    return histories


@torch.no_grad()
def beam_search(decoder: CaptionDecoder, grid: torch.Tensor, trait_ids: torch.Tensor, options: DecodingConfig, *,
                n_best: int = 1, stats: DecodeStats | None = None) -> list[list[Hypothesis]]:
    """The ``n_best`` best finished captions per row, best first (see the module doc); ``stats`` is filled
    with the steps run."""
    rows, width = grid.shape[0], options.beam_size
    stats = stats if stats is not None else DecodeStats()
    stats.rows = rows
    n_best = min(n_best, width)
    bound_penalty = length_penalty(options.max_length + 1, options.length_penalty, options.alpha)
    with eval_mode(decoder):
        ctx, state = _start(decoder, grid, trait_ids)
        expand = torch.arange(rows, device=grid.device).repeat_interleave(width)
        ctx, state = ctx.index_select(expand), tuple(s[expand] for s in state)
        scores = torch.full((rows, width), NEG_INF, device=grid.device)
        scores[:, 0] = 0.0
        histories: list[list[list[int]]] = [[[] for _ in range(width)] for _ in range(rows)]
        finished: list[list[Hypothesis]] = [[] for _ in range(rows)]
        done = [False] * rows
        tokens = torch.full((rows * width,), BOS_ID, dtype=torch.long, device=grid.device)
        for step in range(options.max_length + 1):
            stats.steps = step + 1
            logp, state = _step_logp(decoder, tokens, state, ctx)
            logp = restrict(logp, step, [h for row in histories for h in row], options)
            vocab = logp.shape[-1]
            total = (scores.reshape(-1, 1) + logp).reshape(rows, width * vocab)
            top_scores, top_ids = total.topk(min(2 * width, width * vocab), dim=1)
            new_scores = torch.full((rows, width), NEG_INF, device=grid.device)
            source = torch.zeros((rows, width), dtype=torch.long)
            new_tokens = torch.full((rows, width), PAD_ID, dtype=torch.long)
            new_histories: list[list[list[int]]] = [[[] for _ in range(width)] for _ in range(rows)]
            for row in range(rows):
                if done[row]:
                    continue
                alive = 0
                for value, flat in zip(top_scores[row].tolist(), top_ids[row].tolist(), strict=True):
                    if value == NEG_INF:
                        break
                    beam, token = divmod(flat, vocab)
                    words = histories[row][beam]
                    if token == EOS_ID:
                        finished[row].append(Hypothesis(list(words), penalized(value, len(words) + 1, options), value))
                    elif alive < width:
                        new_scores[row, alive], source[row, alive], new_tokens[row, alive] = value, beam, token
                        new_histories[row][alive] = [*words, token]
                        alive += 1
                done[row] = _row_done(finished[row], new_scores[row], n_best, bound_penalty)
            if all(done):
                break
            order = (torch.arange(rows).unsqueeze(1) * width + source).reshape(-1).to(grid.device)
            state = tuple(s[order] for s in state)
            tokens, scores, histories = new_tokens.reshape(-1).to(grid.device), new_scores, new_histories
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:n_best] for hyps in finished]


def _row_done(finished: list[Hypothesis], alive_scores: torch.Tensor, n_best: int, bound_penalty: float) -> bool:
    best_alive = float(alive_scores.max())
    if best_alive == NEG_INF:
        return True
    if len(finished) < n_best:
        return False
    kth = sorted((h.score for h in finished), reverse=True)[n_best - 1]
    return kth >= best_alive / bound_penalty  # log-probabilities are <= 0, so this bounds every continuation


def decode(decoder: CaptionDecoder, grid: torch.Tensor, trait_ids: torch.Tensor, options: DecodingConfig, *,
           generator: torch.Generator | None = None) -> list[list[int]]:
    """The one caption per row that ``options.method`` picks (beam: the top beam)."""
    if options.method == "greedy":
        return greedy(decoder, grid, trait_ids, options)
    if options.method == "sample":
        return sample(decoder, grid, trait_ids, options, generator=generator)
    return [hyps[0].tokens if hyps else [] for hyps in beam_search(decoder, grid, trait_ids, options)]
