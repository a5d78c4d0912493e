"""save_pretrained / from_pretrained: a checkpoint directory round trip, offline, and hub names that fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from transresnet.checkpoint import Checkpoint, CheckpointError
from transresnet.model import TransResNet


def test_a_directory_round_trip_is_exact(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    saved = tiny_checkpoint.model.save_pretrained(tmp_path / "pretrained", config=tiny_checkpoint.config)
    loaded = TransResNet.from_pretrained(saved)
    original = tiny_checkpoint.model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    assert all(torch.equal(loaded.state_dict()[k], original[k]) for k in original)
    assert loaded.traits.names == tiny_checkpoint.traits.names


def test_saving_without_an_experiment_config_records_the_model_section(tiny_checkpoint: Checkpoint,
                                                                       tmp_path: Path) -> None:
    loaded = TransResNet.from_pretrained(tiny_checkpoint.model.save_pretrained(tmp_path / "bare"))
    assert loaded.config == tiny_checkpoint.model.config


def test_a_hub_name_offline_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a hub repository"):
        TransResNet.from_pretrained("someone/transresnet-flickr8k", cache_dir=tmp_path / "cache")


def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        TransResNet.from_pretrained(tmp_path / "nope")
