"""Training losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def false_negative_mask(caption_ids: torch.Tensor, query_ids: torch.Tensor | None = None) -> torch.Tensor:
    """True where column j must not count as a negative of row i (off the diagonal).

    Two batch entries clash when their captions are the same text (``caption_ids`` equal), or, when
    ``query_ids`` is given, when they come from the same query (same image and trait): a second gold
    caption of one's own photo is not a wrong answer.
    """
    same = caption_ids[:, None] == caption_ids[None, :]
    if query_ids is not None:
        same |= query_ids[:, None] == query_ids[None, :]
    same.fill_diagonal_(False)
    return same


class InBatchSoftmaxLoss(nn.Module):
    """Softmax cross entropy of each query over all captions in the batch; the diagonal is the target."""

    def forward(self, logits: torch.Tensor, caption_ids: torch.Tensor, query_ids: torch.Tensor | None = None,
                extra_logits: torch.Tensor | None = None) -> torch.Tensor:
        """``extra_logits`` (B, N): scores against captions outside the batch that are negatives of every query."""
        assert logits.shape[0] == logits.shape[1], "in-batch loss needs one caption per query"
        masked = logits.masked_fill(false_negative_mask(caption_ids, query_ids), float("-inf"))
        if extra_logits is not None:
            masked = torch.cat([masked, extra_logits.to(masked.dtype)], dim=1)
        targets = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(masked.float(), targets)
