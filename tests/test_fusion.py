"""Folding frozen batch norms into convolutions: the same features from real timm backbones, and a fold
that would change the output (registration order that is not the data flow) is refused."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from transresnet.fusion import fold_batchnorm, folded_for_inference, max_relative_error


def _backbone(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    for module in model.modules():  # statistics far from the identity, as trained ones are
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize(("name", "size", "kwargs", "left"), [
    ("test_resnet", 64, {}, 1),  # its stem Sequential ends in a conv whose norm is the parent's bn1: kept
    ("mobilenetv2_100", 96, {"pad_type": "same"}, 0),  # timm's Conv2dSame and BatchNormAct2d
    ("test_efficientnet", 64, {}, 0),
])
def test_folded_backbones_give_the_same_features(name: str, size: int, kwargs: dict, left: int) -> None:
    model = _backbone(name, **kwargs)
    images = torch.randn(3, 3, size, size)
    folded = folded_for_inference(model, images[:1])
    assert folded is not model and _norms(model) > 5
    assert all(not p.is_inference() for p in folded.parameters())  # usable under no_grad and autograd too
    assert _norms(folded) == left
    with torch.no_grad():
        assert max_relative_error(folded(images), model(images)) < 1e-5
        assert max_relative_error(folded.to(memory_format=torch.channels_last)(images), model(images)) < 1e-5


class _NormBeforeConv(nn.Module):
    """Registers conv then norm, but normalises the input, not the conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.norm.running_mean.fill_(0.5)
        self.norm.weight.data.fill_(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.norm(x)


def test_a_fold_that_changes_the_output_is_refused() -> None:
    model = _NormBeforeConv().eval()
    assert fold_batchnorm(_NormBeforeConv().eval()) == 1  # the pattern matches ...
    assert folded_for_inference(model, torch.randn(2, 4, 8, 8)) is model  # ... but the check refuses it


def test_folding_needs_eval_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(_NormBeforeConv().train())
