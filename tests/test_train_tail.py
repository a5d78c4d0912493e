"""Training the backbone's last parts (``model.image.train_tail``) on cached maps of its frozen front: the split
gives the whole backbone's features, only the tail's weights move, and evaluation runs the tuned backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import random_pixels
from transresnet.checkpoint import load_checkpoint
from transresnet.config import build_config
from transresnet.encoders import tail_input, tail_output, tail_parameters
from transresnet.evaluate import image_features
from transresnet.features import cached_features, weights_identity
from transresnet.images import ImagePreprocessor
from transresnet.train import train


def test_the_tail_on_the_fronts_maps_gives_the_whole_backbones_features() -> None:
    torch.manual_seed(0)
    backbone = timm.create_model("test_efficientnet", num_classes=0).eval()
    pixels = torch.from_numpy(random_pixels((48, 48), 1)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        whole = backbone(pixels)
        for parts in range(1, len(backbone.blocks) + 2):
            torch.testing.assert_close(tail_output(backbone, tail_input(backbone, pixels, parts), parts), whole)
    head = {id(p) for p in (*backbone.conv_head.parameters(), *backbone.bn2.parameters())}
    assert {id(p) for p in tail_parameters(backbone, 1)} == head
    last_stage = {id(p) for p in backbone.blocks[-1].parameters()}
    assert {id(p) for p in tail_parameters(backbone, 2)} == head | last_stage


def test_a_tail_the_backbone_does_not_have_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="EfficientNet-family.*set train_tail: 0"):
        tail_parameters(timm.create_model("test_resnet", num_classes=0), 1)
    backbone = timm.create_model("test_efficientnet", num_classes=0)
    with pytest.raises(ValueError, match=f"has {len(backbone.blocks) + 1} parts to train"):
        tail_parameters(backbone, len(backbone.blocks) + 2)


def test_the_tail_needs_a_frozen_retrieval_backbone(tmp_path: Path) -> None:
    tree = {"model": {"image": {"backbone": "test_efficientnet", "freeze_backbone": False, "train_tail": 1}}}
    with pytest.raises(ValueError, match="train_tail trains the last parts of a frozen, cached backbone"):
        build_config(tree)


def tail_config(data: Path, tmp: Path, weights: Path):
    tree = {
        "model": {
            "image": {"backbone": "test_efficientnet", "weights": str(weights), "image_size": 32,
                      "resize_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "freeze_backbone": True,
                      "train_tail": 2, "dropout": 0.0},
            "personality": {"traits_file": str(data / "personalities.txt")},
            "text": {"kind": "bow", "bow_embed_dim": 32, "dropout": 0.0},
            "hidden_dim": 32,
        },
        "data": {"train": str(data / "captions.csv"), "val": str(data / "val.json"), "examples_per_image": 2,
                 "feature_cache": str(tmp / "features"), "augment_crops": 1},
        "train": {"epochs": 2, "batch_size": 50, "lr": 3e-3, "backbone_lr": 1e-2, "device": "cpu",
                  "max_steps_per_epoch": 3},
    }
    return build_config(tree)


def test_training_moves_only_the_tail_and_evaluation_runs_the_tuned_backbone(synthetic_dataset: Path,
                                                                               tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "test_efficientnet.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), str(weights))
    config = tail_config(synthetic_dataset.parent, tmp_path, weights)
    train(config, tmp_path / "run")

    checkpoint = load_checkpoint(tmp_path / "run" / "best")
    backbone = checkpoint.model.backbone.eval()
    tail = {name for name, p in backbone.named_parameters() if any(p is t for t in tail_parameters(backbone, 2))}
    original, tuned = load_file(str(weights)), backbone.state_dict()
    moved = {name for name in tuned if not torch.equal(tuned[name], original[name])}
    assert moved and moved <= tail, f"weights outside the tail moved: {sorted(moved - tail)[:3]}"
    assert any(name.startswith("blocks.") for name in moved)  # the last stage trained, not only the head

    photos = sorted((synthetic_dataset.parent / "images").iterdir())[:4]
    cfg = checkpoint.config.model.image
    untuned = timm.create_model("test_efficientnet", num_classes=0)
    untuned.load_state_dict({k: v for k, v in original.items() if not k.startswith("classifier")})
    # The weights file's pooled features already sit in the cache: the tuned checkpoint must not read them.
    cached_features(untuned, cfg, photos, root=tmp_path / "features", weights=weights_identity(cfg))
    evaluated = torch.from_numpy(image_features(checkpoint, photos, feature_cache=tmp_path / "features",
                                                batch_size=4))
    pixels = torch.stack([ImagePreprocessor(cfg).load(p) for p in photos])
    with torch.inference_mode():
        torch.testing.assert_close(evaluated, backbone(pixels), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(evaluated, untuned.eval()(pixels), atol=1e-3)
