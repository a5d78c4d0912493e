"""The in-batch softmax loss against hand-computed values, with repeated captions masked."""

import math

import torch

from transresnet.loss import InBatchSoftmaxLoss, false_negative_mask


def test_loss_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.0, 0.0], [0.0, 3.0, 0.0]])
    ids = torch.tensor([0, 1, 2])
    expected = -sum(
        math.log(math.exp(row[i]) / sum(math.exp(v) for v in row)) for i, row in enumerate(logits.tolist())
    ) / 3
    assert InBatchSoftmaxLoss()(logits, ids).item() == torch.tensor(expected).item()


def test_repeated_caption_is_not_a_negative() -> None:
    # Rows 0 and 2 share their caption: each must not be pushed away from the other's copy.
    logits = torch.tensor([[1.0, 0.0, 5.0], [0.0, 1.0, 0.0], [5.0, 0.0, 1.0]])
    ids = torch.tensor([7, 8, 7])
    loss = InBatchSoftmaxLoss()(logits, ids)
    row0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(0)))
    row1 = -math.log(math.exp(1) / (math.exp(1) + 2 * math.exp(0)))
    assert abs(loss.item() - (2 * row0 + row1) / 3) < 1e-6
    unmasked = torch.nn.functional.cross_entropy(logits, torch.arange(3))
    assert unmasked.item() > loss.item() + 1.0


def test_same_query_other_gold_is_masked() -> None:
    mask = false_negative_mask(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 2]))
    assert mask.tolist() == [
        [False, True, False, False],
        [True, False, False, False],
        [False, False, False, False],
        [False, False, False, False],
    ]


def test_extra_negatives_join_the_softmax() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    extra = torch.tensor([[1.0], [3.0]])
    loss = InBatchSoftmaxLoss()(logits, torch.tensor([0, 1]), extra_logits=extra)
    row0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(1)))
    row1 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(3)))
    assert abs(loss.item() - (row0 + row1) / 2) < 1e-6
