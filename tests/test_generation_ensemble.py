"""Ensembles of caption generators: the step averages the members' probabilities, beam search over an ensemble
is exhaustive search over it and batch-independent, and checkpoints that cannot decode together are refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_generation_decoding import exhaustive_best, inputs, tiny_decoder
from tests.test_generation_train import generator_tree
from transresnet.checkpoint import CheckpointError
from transresnet.config import DecodingConfig
from transresnet.generation.decoding import beam_search
from transresnet.generation.ensemble import EnsembleDecoder, load_ensemble
from transresnet.generation.vocab import BOS_ID

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_step_is_the_log_of_the_members_mean_probability() -> None:
    members = [tiny_decoder("updown", "lstm", seed=0), tiny_decoder("showatttell", "gru", seed=1)]
    ensemble = EnsembleDecoder(members)
    grid, traits = inputs(rows=3)
    words = torch.tensor([[BOS_ID, 4, 5], [BOS_ID, 6, 4], [BOS_ID, 5, 5]])
    with torch.no_grad():
        probs = [torch.softmax(m(grid, traits, words), dim=-1) for m in members]
        combined = ensemble(grid, traits, words)
    assert torch.allclose(combined.exp(), (probs[0] + probs[1]) / 2, atol=1e-6)
    assert torch.allclose(combined.exp().sum(-1), torch.ones(3, 3), atol=1e-5)


def test_an_ensemble_of_copies_decodes_as_its_member() -> None:
    member = tiny_decoder("updown", "lstm", seed=2)
    grid, traits = inputs(rows=4, seed=3)
    options = DecodingConfig(beam_size=3, length_penalty="wu", alpha=0.7, max_length=6)
    alone = beam_search(member, grid, traits, options, n_best=3)
    together = beam_search(EnsembleDecoder([member, member, member]), grid, traits, options, n_best=3)
    assert [[h.tokens for h in row] for row in together] == [[h.tokens for h in row] for row in alone]
    assert [h.score for row in together for h in row] == pytest.approx([h.score for row in alone for h in row],
                                                                       abs=1e-5)


@pytest.mark.parametrize("penalty,alpha", [("none", 0.0), ("wu", 0.7)])
def test_beam_search_over_an_ensemble_equals_exhaustive_search(penalty: str, alpha: float) -> None:
    ensemble = EnsembleDecoder([tiny_decoder("updown", "gru", seed=s) for s in (4, 5, 6)])
    grid, traits = inputs(rows=4, seed=8)
    options = DecodingConfig(beam_size=27, length_penalty=penalty, alpha=alpha, min_length=1, max_length=3)
    found = [hyps[0].tokens for hyps in beam_search(ensemble, grid, traits, options)]
    assert found == exhaustive_best(ensemble, grid, traits, options)
    # The ensemble is not just one of its members.
    singles = [[h[0].tokens for h in beam_search(m, grid, traits, options)] for m in ensemble.members]
    assert any(found != single for single in singles)


def test_beam_search_over_an_ensemble_batched_equals_one_by_one() -> None:
    ensemble = EnsembleDecoder([tiny_decoder("updown", "lstm", seed=s) for s in (7, 8)])
    grid, traits = inputs(rows=5, seed=9)
    options = DecodingConfig(beam_size=3, length_penalty="wu", alpha=0.7, max_length=6, no_repeat_ngram=2)
    batched = beam_search(ensemble, grid, traits, options, n_best=3)
    for row in range(5):
        alone = beam_search(ensemble, grid[row:row + 1], traits[row:row + 1], options, n_best=3)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[row]]


def test_members_must_share_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        EnsembleDecoder([tiny_decoder(), _other_vocab_decoder()])
    with pytest.raises(ValueError, match="at least two"):
        EnsembleDecoder([tiny_decoder()])


def _other_vocab_decoder():
    from transresnet.config import DecoderConfig
    from transresnet.generation.models import create_decoder

    return create_decoder("updown", DecoderConfig(embed_dim=8, hidden_dim=12, feature_dim=10, attention_dim=6),
                          vocab_size=9, grid_dim=6, trait_slots=3)


def _train(tree: dict, folder: Path) -> Path:
    from transresnet.cli import main

    config = folder.parent / f"{folder.name}.yaml"
    config.write_text(yaml.safe_dump(tree))
    assert main(["train", "--config", str(config), "--out", str(folder)]) == 0
    return folder / "best"


@pytest.mark.slow
def test_eval_decodes_an_ensemble_of_seeds_and_refuses_a_mismatched_member(synthetic_dataset: Path, plain_checkpoint,
                                                                          tmp_path: Path) -> None:
    from transresnet.cli import main

    def tree(seed: int, **vocab: object) -> dict:
        config = generator_tree(synthetic_dataset, tmp_path / "cache")
        config["train"].update(epochs=1, max_steps_per_epoch=8, seed=seed)
        config["model"]["decoder"]["vocab"].update(vocab)
        return config

    seeds = [_train(tree(s), tmp_path / f"s{s}") for s in (0, 1)]

    def evaluate(name: str, *members: Path) -> dict:
        flags = ["--ensemble", *map(str, members)] if members else []
        assert main(["eval", "--checkpoint", str(seeds[0]), *flags, "--data", str(synthetic_dataset), "--split",
                     "val", "--protocol", "generate", "--beam-size", "2", "--out", str(tmp_path / name)]) == 0
        return json.loads((tmp_path / name / "eval.json").read_text())

    alone, pair = evaluate("alone"), evaluate("pair", seeds[1])
    assert pair["ensemble"] == [str(seeds[1])] and alone["ensemble"] == []
    assert "an ensemble of 2 checkpoints" in (tmp_path / "pair" / "eval.md").read_text()
    assert [e["caption"] for e in pair["examples"]] != [e["caption"] for e in alone["examples"]]
    # The same checkpoint twice is the checkpoint alone.
    twin = tmp_path / "twin"
    shutil.copytree(seeds[0], twin)
    twice = evaluate("twice", twin)
    assert [e["caption"] for e in twice["examples"]] == [e["caption"] for e in alone["examples"]]
    assert math.isclose(twice["cider_d"], alone["cider_d"], abs_tol=1e-9)

    other_vocab = _train(tree(0, level="char"), tmp_path / "other")
    with pytest.raises(CheckpointError, match="different caption vocabulary"):
        load_ensemble([seeds[0], other_vocab])
    with pytest.raises(CheckpointError, match="is a retrieval checkpoint, not a caption generator"):
        load_ensemble([seeds[0], plain_checkpoint.path])
    assert main(["eval", "--checkpoint", str(seeds[0]), "--ensemble", str(other_vocab), "--data",
                 str(synthetic_dataset), "--split", "val", "--protocol", "generate", "--out",
                 str(tmp_path / "refused")]) != 0
    assert main(["eval", "--checkpoint", str(seeds[0]), "--ensemble", str(seeds[1]), "--data",
                 str(synthetic_dataset), "--split", "val", "--protocol", "pool", "--out",
                 str(tmp_path / "pool")]) != 0
