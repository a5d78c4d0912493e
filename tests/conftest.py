"""Shared fixtures: tiny random models built from local files only (no hub, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from transresnet.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from transresnet.config import ExperimentConfig, build_config  # noqa: E402
from transresnet.model import create_model  # noqa: E402
from transresnet.traits import TraitVocab  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONFIGS_DIR = REPO / "configs"
TINY_TRAITS = ["Sarcastic", "Sweet", "Angry", "Cheerful"]


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or a pytest skip when this machine does not have it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (real data and weights live in ../shared on development machines)")
    return path


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer random BERT with MiniLM's real tokenizer, saved as a local folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from transresnet.encoders import resolve_text_model

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_tree(text_model: Path, **sections: dict) -> dict:
    """A config tree for a tiny model: timm's test_resnet at 32 px, hidden 16, the tiny BERT."""
    tree = {
        "name": "tiny",
        "model": {
            "image": {"backbone": "test_resnet", "image_size": 32, "resize_size": 32, "freeze_backbone": True},
            "text": {"model": str(text_model), "max_length": 16},
            "hidden_dim": 16,
        },
        "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "seed": 0},
    }
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return tree


@pytest.fixture(scope="session")
def tiny_config(tiny_text_model: Path) -> ExperimentConfig:
    return build_config(tiny_tree(tiny_text_model))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config: ExperimentConfig) -> Checkpoint:
    """A saved and reloaded random tiny checkpoint (traits: Sarcastic, Sweet, Angry, Cheerful)."""
    torch.manual_seed(0)
    model = create_model(tiny_config.model, TraitVocab(TINY_TRAITS))
    path = save_checkpoint(model, tiny_config, tmp_path_factory.mktemp("ckpt") / "best")
    return load_checkpoint(path)
