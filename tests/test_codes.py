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


def test_code_overlap_is_one_for_two_merged_codes_and_small_for_distinct_ones():
    from fuse_lightning.losses import code_overlap

    torch.manual_seed(0)
    labels = _labels(10, 4)
    v = torch.randn(3, 8, 8)
    sign = torch.tensor([1, -1, -1, -1, -1, 1, -1, 1, 1, 1.0])
    merged = (sign[labels].view(-1, 1, 1, 1) * v).requires_grad_(True)
    assert float(code_overlap(merged.detach(), labels)) == pytest.approx(1.0, abs=1e-5)
    distinct = torch.randn(10, 3, 8, 8)[labels]
    assert float(code_overlap(distinct, labels)) < 0.05  # random 192-dim codes: nearly orthogonal
    noisy = merged + 0.3 * torch.randn_like(merged)
    loss = code_overlap(noisy, labels)
    loss.backward()
    assert merged.grad is not None and merged.grad.abs().sum() > 0  # differentiable
    assert float(code_overlap(distinct, torch.zeros(40, dtype=torch.long))) == 0.0  # one class
