"""Training on synthetic data must learn, must use the personality, and must resume."""

import json
from pathlib import Path

import pytest

from transresnet.checkpoint import load_checkpoint
from transresnet.config import build_config
from transresnet.train import train


@pytest.fixture(scope="module")
def synthetic_data(synthetic_dataset: Path) -> Path:
    """The folder of the session's synthetic dataset (conftest)."""
    return synthetic_dataset.parent


def synthetic_config(data: Path, tmp: Path, **train_overrides):
    """The demo's recipe shrunk for a CPU test: 32 px, a bag-of-words text encoder, a few epochs."""
    tree = {
        "model": {
            "image": {"backbone": "test_resnet", "image_size": 32, "resize_size": 32, "mean": [0.5] * 3,
                      "std": [0.5] * 3, "freeze_backbone": False, "hidden_layers": 1, "dropout": 0.0},
            "personality": {"traits_file": str(data / "personalities.txt")},
            "text": {"kind": "bow", "bow_embed_dim": 64, "dropout": 0.0},
            "hidden_dim": 64,
        },
        "data": {"train": str(data / "captions.csv"), "val": str(data / "val.json"), "test": str(data / "test.json"),
                 "examples_per_image": 5, "feature_cache": str(tmp / "features")},
        "train": {"epochs": 14, "batch_size": 100, "lr": 3e-3, "device": "cpu", "patience": 20, **train_overrides},
    }
    return build_config(tree)


@pytest.mark.slow
def test_synthetic_training_learns_and_uses_the_personality(synthetic_data: Path, tmp_path: Path) -> None:
    result = train(synthetic_config(synthetic_data, tmp_path), tmp_path / "run")
    report = result.metrics
    # 100 candidates per query: chance R@1 is 1%.
    assert report["test"]["R@1"] >= 50, report["test"]
    assert report["test_traits_shuffled"]["R@1"] <= report["test"]["R@1"] / 2
    assert report["test_traits_none"]["R@1"] <= report["test"]["R@1"] / 2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 14 and json.loads(lines[-1])["val"]["R@1"] > json.loads(lines[0])["val"]["R@1"]
    assert load_checkpoint(result.best_checkpoint).fingerprint


def test_resume_continues_where_it_stopped(synthetic_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(synthetic_config(synthetic_data, tmp_path, epochs=1, max_steps_per_epoch=2), run)
    resumed = train(synthetic_config(synthetic_data, tmp_path, epochs=2, max_steps_per_epoch=2), run, resume=True)
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert resumed.best_checkpoint.is_dir()
    assert (run / "config.yaml").is_file() and (run / "last" / "train_state.safetensors").is_file()


def test_resume_without_a_run_is_a_clear_error(synthetic_data: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(synthetic_config(synthetic_data, tmp_path, epochs=1), tmp_path / "empty", resume=True)


def test_frozen_backbone_features_are_cached_once(synthetic_data: Path, tmp_path: Path, caplog) -> None:
    config = synthetic_config(synthetic_data, tmp_path, epochs=1, max_steps_per_epoch=1)
    config.model.image.freeze_backbone = True
    train(config, tmp_path / "a")
    caches = list((tmp_path / "features").iterdir())
    assert len(caches) == 1 and (caches[0] / "features.npy").is_file()
    caplog.clear()
    with caplog.at_level("INFO", logger="transresnet.features"):
        train(config, tmp_path / "b")
    assert not any("cached" in r.message for r in caplog.records), "second run recomputed features"
