"""The caption vocabulary, the shared tokenisation, and the captioning metrics against pycocoevalcap."""

from __future__ import annotations

import math

import pytest

from transresnet.generation.metrics import (
    VoiceClassifier,
    caption_scores,
    tokenized_inputs,
    vocabulary_usage,
)
from transresnet.generation.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, Vocabulary, normalize, tokenize

REFS = {
    "dog": ["A black dog runs across the grass.", "A dog is running on a lawn", "The black dog runs outside ."],
    "kids": ["Two children play soccer on a field.", "Kids playing football", "Two kids are playing soccer."],
    "bike": ["A man rides a bike down the street", "A cyclist on a road .", "A man riding his bicycle."],
}


def test_tokenize_lower_cases_and_strips_punctuation() -> None:
    assert tokenize("A dog, running -- fast!  'Quoted' dog's") == ["a", "dog", "running", "fast", "quoted", "dog's"]
    assert normalize("The DOG .") == "the dog"


def test_word_vocabulary_min_count_and_round_trip() -> None:
    vocab = Vocabulary.build(["a dog runs", "A dog sits.", "a cat"], min_count=2)
    assert vocab.tokens == [*SPECIALS, "a", "dog"]
    assert vocab.encode("A dog jumps") == [4, 5, UNK_ID]
    assert vocab.decode([BOS_ID, 4, 5, EOS_ID, 4]) == "a dog"
    assert vocab.decode([4, PAD_ID, 5]) == "a dog"
    assert Vocabulary.from_json(vocab.to_json()).tokens == vocab.tokens
    assert len(Vocabulary.build(["a b c d e f"], max_size=6)) == 6


def test_character_vocabulary() -> None:
    vocab = Vocabulary.build(["A cat.", "a dog"], level="char")
    assert " " in vocab.tokens and "." not in vocab.tokens
    assert vocab.decode(vocab.encode("a cat")) == "a cat"
    assert Vocabulary.from_json(vocab.to_json()).level == "char"


def reference_scores(gts: dict, res: dict) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {**{f"bleu_{i + 1}": 100 * b for i, b in enumerate(bleu)},
            "rouge_l": 100 * Rouge().compute_score(gts, res)[0], "cider_d": 100 * Cider().compute_score(gts, res)[0]}


def test_scores_equal_pycocoevalcap_on_the_tokenised_input() -> None:
    hyps = {"dog": "a black dog runs on the grass", "kids": "two kids play soccer", "bike": "a man on a bike"}
    gts, res = tokenized_inputs(REFS, hyps)
    assert gts["0"][0] == "a black dog runs across the grass"
    ours = caption_scores(REFS, hyps)
    for key, value in reference_scores(gts, res).items():
        assert ours[key] == pytest.approx(value, abs=1e-6)
    assert 0 < ours["bleu_4"] < ours["bleu_1"] <= 100


def test_bleu_length_ratio_is_the_words_over_the_closest_references_words() -> None:
    refs = {"a": ["one two three four five", "one two"], "b": ["a b c d e f g h"]}
    hyps = {"a": "one two three", "b": "a b c d"}  # the closest references have 2 and 8 words
    assert caption_scores(refs, hyps)["bleu_length_ratio"] == pytest.approx((3 + 4) / (2 + 8))
    brief = caption_scores(REFS, {"dog": "a dog", "kids": "kids", "bike": "a man"})
    assert brief["bleu_length_ratio"] < 0.5


def test_scores_ignore_case_and_punctuation_and_reward_the_right_caption() -> None:
    plain = {"dog": "a black dog runs", "kids": "two kids playing soccer", "bike": "a man rides a bike"}
    shouted = {k: v.upper() + " !" for k, v in plain.items()}
    assert caption_scores(REFS, shouted) == caption_scores(REFS, plain)
    swapped = {"dog": plain["bike"], "kids": plain["dog"], "bike": plain["kids"]}
    assert caption_scores(REFS, swapped)["cider_d"] < caption_scores(REFS, plain)["cider_d"] / 3


def test_cider_d_of_a_caption_equal_to_its_only_reference_is_10() -> None:
    refs = {"a": ["red circle on white"], "b": ["blue square on black"], "c": ["green star near a tree"]}
    hyps = {k: v[0] for k, v in refs.items()}
    assert caption_scores(refs, hyps)["cider_d"] == pytest.approx(1000.0)  # 10 in pycocoevalcap's units, x 100
    longer = {k: v + " today again" for k, v in hyps.items()}
    penalty = math.exp(-(3 ** 2) / (2 * 6.0 ** 2))  # Gaussian length penalty, sigma 6, three extra words
    assert caption_scores(refs, longer)["cider_d"] < 1000.0 * penalty


def test_empty_captions_score_zero_without_crashing() -> None:
    scores = caption_scores(REFS, dict.fromkeys(REFS, "!!"))
    assert scores["rouge_l"] == 0 and scores["cider_d"] == 0


def test_vocabulary_usage_and_voice_classifier() -> None:
    usage = vocabulary_usage(["a dog runs", "A dog runs.", "a new caption"], ["a dog runs", "other"])
    assert usage == {"distinct_words": 5, "distinct_captions": 2, "mean_length": 3.0,
                     "novel_pct": pytest.approx(100 / 3)}
    clf = VoiceClassifier(["ugh I hate this red thing", "aww so sweet a red thing", "ugh blue mess I hate",
                           "aww precious blue thing"], ["Angry", "Sweet", "Angry", "Sweet"])
    assert clf.predict("ugh a green thing I hate") == "Angry"
    assert clf.accuracy(["aww green", "ugh green"], ["Sweet", "Sweet"]) == 50.0


def test_cider_d_reward_equals_pycocoevalcap_per_caption_on_the_same_corpus() -> None:
    """Self-critical training's per-caption CIDEr-D: pycocoevalcap's scores when the corpus is the scored set,
    and fixed document frequencies (not the batch's) when only some items are scored."""
    from pycocoevalcap.cider.cider import Cider

    from transresnet.generation.metrics import CiderD

    hyps = {"dog": "A black dog runs on the grass!", "kids": "two kids play soccer", "bike": "a man on a bike"}
    gts, res = tokenized_inputs(REFS, hyps)
    _, per_caption = Cider().compute_score(gts, res)
    scorer = CiderD(list(REFS.values()))
    ours = scorer.scores(list(hyps.values()), [0, 1, 2])
    assert ours == pytest.approx(list(per_caption), abs=1e-6)
    assert scorer.score(hyps["kids"], 1) == pytest.approx(per_caption[1], abs=1e-6)  # alone: the same statistics
    assert scorer.score(hyps["kids"], 0) < 0.1 * ours[1]  # the right image's references score it far higher


def test_cider_d_reward_with_an_end_token_penalises_a_caption_cut_mid_phrase() -> None:
    from transresnet.generation.metrics import CiderD

    refs = [["a dog runs on the grass", "a dog is running on the grass", "the dog runs on grass"],
            *REFS.values()]
    plain, ended = CiderD(refs), CiderD(refs, end_token="<eos>")
    whole, cut = "a dog runs on the grass", "a dog runs on the"
    assert ended.score(whole, 0) > plain.score(whole, 0) * 0.9  # a whole caption keeps its score
    assert ended.score(cut, 0) / ended.score(whole, 0) < plain.score(cut, 0) / plain.score(whole, 0)
