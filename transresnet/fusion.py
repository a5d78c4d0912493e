"""Inference-only folding of frozen batch norms into the convolutions before them.

A backbone in eval mode normalises every conv output with fixed statistics: ``y = gamma * (conv(x) - mean)
/ sqrt(var + eps) + beta`` is itself a convolution with rescaled weights and a bias. Folding removes the
separate pass over every activation map (about a fifth of an EfficientNet-Lite2 forward on CPU in a py-spy
profile of the service). The folded backbone gives the same features up to float rounding, and that is
checked on a sample before it is used (:func:`folded_for_inference`); it cannot be trained or saved as a
checkpoint (its state dict has no batch-norm entries), so only serving paths use it.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)

MAX_RELATIVE_ERROR = 1e-4
"""Largest |folded - original| / max|original| over the check sample for the folded backbone to be used."""


def _is_batchnorm(module: nn.Module) -> bool:
    # Exactly BatchNorm2d or timm's BatchNormAct2d (norm, then drop, then activation); other subclasses
    # (frozen or synchronised variants) may do more than normalise and are left alone.
    from timm.layers import BatchNormAct2d

    return type(module) in (nn.BatchNorm2d, BatchNormAct2d) and module.track_running_stats


def _after_norm(norm: nn.Module) -> nn.Module:
    """What the norm did after normalising: timm's BatchNormAct2d applies its dropout and activation."""
    drop, act = getattr(norm, "drop", None), getattr(norm, "act", None)
    parts = [m for m in (drop, act) if m is not None and not isinstance(m, nn.Identity)]
    return nn.Sequential(*parts) if parts else nn.Identity()


def fold_batchnorm(module: nn.Module) -> int:
    """Fold, in place, every batch norm registered right after a Conv2d of the same width in the same parent
    (timm's EfficientNet, MobileNet and ResNet blocks register them in call order); returns the folds made.
    The module must be in eval mode. Registration order is not proof of data flow: check the result."""
    if module.training:
        raise ValueError("fold_batchnorm needs a module in eval mode (training uses batch statistics)")
    folds = 0
    for parent in list(module.modules()):
        names = list(parent._modules)
        for before, after in zip(names, names[1:], strict=False):
            conv, norm = parent._modules[before], parent._modules[after]
            if (isinstance(conv, nn.Conv2d) and norm is not None and _is_batchnorm(norm)
                    and conv.out_channels == norm.num_features):
                parent._modules[before] = fuse_conv_bn_eval(conv, norm)
                parent._modules[after] = _after_norm(norm)
                folds += 1
    return folds


def check_sample(image_size: int, batch: int = 2) -> torch.Tensor:
    """A fixed pseudo-random batch in the normalised pixel range, for checking a folded backbone."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, image_size, image_size, generator=generator) * 2.0 - 1.0


def max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def folded_for_inference(backbone: nn.Module, sample: torch.Tensor) -> nn.Module:
    """A copy of ``backbone`` (eval mode) with its batch norms folded, when its output on ``sample`` stays
    within :data:`MAX_RELATIVE_ERROR` of the original's; otherwise the original, with the reason logged."""
    backbone.eval()
    with torch.no_grad():  # not inference mode: the folded weights must stay usable outside it
        folded = copy.deepcopy(backbone)
        folds = fold_batchnorm(folded)
        if not folds:
            logger.info("no batch norm to fold in %s", type(backbone).__name__)
            return backbone
        error = max_relative_error(folded(sample), backbone(sample))
    if error > MAX_RELATIVE_ERROR:
        logger.warning("folding %d batch norms changes %s's output by %.2g (over %.0e): serving it unfolded",
                       folds, type(backbone).__name__, error, MAX_RELATIVE_ERROR)
        return backbone
    logger.info("folded %d batch norms into the convolutions of %s (output within %.1e)", folds,
                type(backbone).__name__, error)
    return folded
