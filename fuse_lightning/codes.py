"""Class structure of a perturbation: how much of it is a per-class code, and how many codes.

A sample-wise generator conditioned on the label tends to write a per-class pattern (the
shortcut a victim learns). Two numbers describe it:

* `class_share`: the share of delta's energy that is its class's mean delta (1 for a class-wise
  code, about 1 / images-per-class for unstructured noise);
* `code_rank`: the effective number of distinct class codes, the participation ratio
  (sum s^2)^2 / sum s^4 of the singular values s of the centred class means. C classes with
  distinct codes give up to C - 1; a generator that has collapsed to two codes shared by groups
  of classes (seen at 64x64: then only the two groups are separable by the shortcut) gives ~1.
"""

from __future__ import annotations

import torch

__all__ = ["class_means", "class_share", "code_rank"]


def class_means(delta: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean delta of each class present in `labels`, flattened: (classes present, D).

    A one-hot matrix product, so it is differentiable (`losses.code_overlap` trains through it)
    and keeps delta's dtype; callers that need precision pass float64.
    """
    flat = delta.reshape(len(delta), -1)
    onehot = (labels[:, None] == labels.unique()[None, :]).to(flat.dtype)  # (N, classes present)
    return (onehot.T @ flat) / onehot.sum(0)[:, None]


def class_share(delta: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of delta's energy that is the mean delta of each image's class."""
    delta = delta.double()
    total = delta.pow(2).sum()
    counts = torch.unique(labels, return_counts=True)[1].double()
    explained = (class_means(delta, labels).pow(2).sum(1) * counts).sum()
    return float(explained / total) if total > 0 else 0.0


def code_rank(delta: torch.Tensor, labels: torch.Tensor) -> float:
    """Effective number of distinct class codes (participation ratio of the centred class means).

    Args:
        delta: Perturbations (N, C, H, W) (or any (N, ...) shape).
        labels: Class of each perturbation (N,).

    Returns:
        A value in [0, classes present - 1]; 0 when every class has the same mean.
    """
    means = class_means(delta.double(), labels)
    centred = means - means.mean(0, keepdim=True)
    power = torch.linalg.svdvals(centred).pow(2)
    if float(power.sum()) == 0.0:
        return 0.0
    return float(power.sum() ** 2 / power.pow(2).sum())
