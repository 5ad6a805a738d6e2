"""Class-structure statistics of a perturbation (fuse_lightning.codes)."""

from __future__ import annotations

import pytest
import torch

from fuse_lightning.codes import class_share, code_rank


def _labels(classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(per_class)


def test_classwise_code_is_all_class_share_and_full_rank():
    torch.manual_seed(0)
    codes = torch.randn(10, 3, 16, 16)  # 10 distinct random codes, 768 dimensions
    labels = _labels(10, 20)
    delta = codes[labels]
    assert class_share(delta, labels) == pytest.approx(1.0)
    assert code_rank(delta, labels) > 7.5  # close to the maximum, 9


def test_two_codes_shared_by_groups_of_classes_have_rank_one():
    """The collapse seen at 64x64: classes split into two groups writing +v and -v."""
    torch.manual_seed(0)
    v = torch.randn(3, 16, 16)
    labels = _labels(10, 20)
    sign = torch.tensor([1, -1, -1, -1, -1, 1, -1, 1, 1, 1.0])
    delta = sign[labels].view(-1, 1, 1, 1) * v + 0.05 * torch.randn(200, 3, 16, 16)
    assert class_share(delta, labels) > 0.9
    assert code_rank(delta, labels) < 1.1


def test_unstructured_noise_has_small_class_share():
    torch.manual_seed(0)
    labels = _labels(10, 50)
    delta = torch.randn(500, 3, 8, 8)
    assert class_share(delta, labels) < 0.05  # about 1 / 50 images per class
    assert code_rank(torch.zeros(500, 3, 8, 8), labels) == 0.0
