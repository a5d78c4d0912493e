"""Decoders and decoding: shapes for every family and cell, beam search against exhaustive search,
batched against one by one, greedy and sampling limits."""

from __future__ import annotations

import itertools

import pytest
import torch

from transresnet.config import DecoderConfig, DecodingConfig
from transresnet.generation.decoding import (
    beam_search,
    blocked_ngrams,
    filter_top,
    greedy,
    penalized,
    restrict,
    sample,
)
from transresnet.generation.models import DECODERS, create_decoder
from transresnet.generation.vocab import BOS_ID, EOS_ID

VOCAB = 7  # <pad> <bos> <eos> <unk> + three words
GRID_DIM = 6


def tiny_decoder(family: str = "updown", cell: str = "lstm", seed: int = 0, **cfg: object):
    torch.manual_seed(seed)
    config = DecoderConfig(cell=cell, embed_dim=8, hidden_dim=12, feature_dim=10, attention_dim=6, dropout=0.0,
                           trait_dim=4, **cfg)
    decoder = create_decoder(family, config, vocab_size=VOCAB, grid_dim=GRID_DIM, trait_slots=3).eval()
    # Sharper, more varied distributions than a fresh init gives, so the search problem is not trivial.
    with torch.no_grad():
        decoder.out.weight.mul_(8.0)
    return decoder


def inputs(rows: int = 3, cells: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cells, GRID_DIM, generator=gen), torch.arange(rows) % 3


@pytest.mark.parametrize("family", sorted(DECODERS))
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_every_family_and_cell_gives_next_word_logits(family: str, cell: str) -> None:
    decoder = tiny_decoder(family, cell)
    grid, traits = inputs()
    words = torch.tensor([[BOS_ID, 4, 5], [BOS_ID, 6, 4], [BOS_ID, 5, 5]])
    logits = decoder(grid, traits, words)
    assert logits.shape == (3, 3, VOCAB)
    logits.sum().backward()
    assert decoder.embed.weight.grad is not None and decoder.trait.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", [{"image_input": "first_input"}, {"image_every_step": True},
                                     {"trait_in_init": True}])
def test_showtell_variants_use_the_image(variant: dict) -> None:
    decoder = tiny_decoder("showtell", "rnn", **variant)
    grid, traits = inputs()
    words = torch.full((3, 2), BOS_ID)
    other = decoder(grid + 1.0, traits, words)
    assert not torch.allclose(decoder(grid, traits, words), other)


@torch.no_grad()
def exhaustive_best(decoder, grid: torch.Tensor, traits: torch.Tensor, options: DecodingConfig) -> list[list[int]]:
    """Score every caption of min_length..max_length words (ids 4..VOCAB-1) by teacher forcing."""
    best = []
    for row in range(grid.shape[0]):
        candidates = [list(c) for n in range(options.min_length, options.max_length + 1)
                      for c in itertools.product(range(4, VOCAB), repeat=n)]
        scored = []
        for words in candidates:
            sequence = torch.tensor([[BOS_ID, *words]])
            logp = torch.log_softmax(decoder(grid[row:row + 1], traits[row:row + 1], sequence)[0].float(), -1)
            allowed = [restrict(logp[t:t + 1], t, [words[:t]], options)[0] for t in range(len(words) + 1)]
            total = sum(float(allowed[t][w]) for t, w in enumerate([*words, EOS_ID]))
            scored.append((penalized(total, len(words) + 1, options), words))
        best.append(max(scored, key=lambda s: s[0])[1])
    return best


@pytest.mark.parametrize("family", sorted(DECODERS))
@pytest.mark.parametrize("penalty,alpha", [("none", 0.0), ("avg", 0.0), ("wu", 0.7), ("wu", 2.0)])
def test_beam_search_equals_exhaustive_search(family: str, penalty: str, alpha: float) -> None:
    decoder = tiny_decoder(family, "gru")
    grid, traits = inputs(rows=4)
    options = DecodingConfig(method="beam", beam_size=27, length_penalty=penalty, alpha=alpha, min_length=1,
                             max_length=3)
    found = [hyps[0].tokens for hyps in beam_search(decoder, grid, traits, options)]
    assert found == exhaustive_best(decoder, grid, traits, options)


def test_beam_search_with_ngram_blocking_equals_exhaustive_search() -> None:
    decoder = tiny_decoder("showtell", "lstm", seed=3)
    grid, traits = inputs(rows=3, seed=5)
    options = DecodingConfig(beam_size=27, length_penalty="avg", min_length=2, max_length=3, no_repeat_ngram=1)
    found = [hyps[0].tokens for hyps in beam_search(decoder, grid, traits, options)]
    assert found == exhaustive_best(decoder, grid, traits, options)
    assert all(len(set(words)) == len(words) and len(words) >= 2 for words in found)


@pytest.mark.parametrize("beam", [1, 3])
def test_beam_search_batched_equals_one_by_one(beam: int) -> None:
    decoder = tiny_decoder("updown", "lstm")
    grid, traits = inputs(rows=5, seed=7)
    options = DecodingConfig(beam_size=beam, length_penalty="wu", alpha=0.7, max_length=6, no_repeat_ngram=2)
    batched = beam_search(decoder, grid, traits, options, n_best=beam)
    for row in range(5):
        alone = beam_search(decoder, grid[row:row + 1], traits[row:row + 1], options, n_best=beam)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[row]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in batched[row]], abs=1e-5)


def test_beam_of_one_without_penalty_is_greedy_and_top_k_one_sampling_too() -> None:
    decoder = tiny_decoder("showatttell", "lstm")
    grid, traits = inputs(rows=6, seed=2)
    options = DecodingConfig(beam_size=1, length_penalty="none", max_length=8, top_k=1)
    beams = [h[0].tokens for h in beam_search(decoder, grid, traits, options)]
    assert beams == greedy(decoder, grid, traits, options)
    assert sample(decoder, grid, traits, options, generator=torch.Generator().manual_seed(0)) == beams


def test_greedy_batched_equals_one_by_one_and_respects_lengths() -> None:
    decoder = tiny_decoder("updown", "rnn")
    grid, traits = inputs(rows=4)
    options = DecodingConfig(method="greedy", min_length=2, max_length=5)
    batched = greedy(decoder, grid, traits, options)
    assert batched == [greedy(decoder, grid[i:i + 1], traits[i:i + 1], options)[0] for i in range(4)]
    assert all(2 <= len(words) <= 5 and set(words) <= set(range(4, VOCAB)) for words in batched)


def test_traits_change_the_distribution() -> None:
    decoder = tiny_decoder("updown", "lstm")
    grid, _ = inputs(rows=1)
    words = torch.tensor([[BOS_ID]])
    assert not torch.allclose(decoder(grid, torch.tensor([1]), words), decoder(grid, torch.tensor([2]), words))


def test_filter_top_keeps_top_k_and_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_top(logits, 2, 1.0)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top(logits, 0, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top(logits, 0, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_top(logits, 0, 0.1)).tolist() == [[True, False, False, False]]


def test_sampling_follows_the_temperature() -> None:
    decoder = tiny_decoder("showtell", "gru")
    grid, traits = inputs(rows=64)
    grid, traits = grid[:1].expand(64, -1, -1), traits[:1].expand(64)
    cold = sample(decoder, grid, traits, DecodingConfig(temperature=0.01, max_length=4),
                  generator=torch.Generator().manual_seed(0))
    hot = sample(decoder, grid, traits, DecodingConfig(temperature=5.0, max_length=4),
                 generator=torch.Generator().manual_seed(0))
    assert len({tuple(c) for c in cold}) == 1
    assert len({tuple(c) for c in hot}) > 5


def test_blocked_ngrams() -> None:
    assert blocked_ngrams([4, 5, 4], 2) == {5}
    assert blocked_ngrams([4, 5, 6], 1) == {4, 5, 6}
    assert blocked_ngrams([4, 5, 6, 4, 5], 3) == {6}
    assert blocked_ngrams([4], 3) == set()
