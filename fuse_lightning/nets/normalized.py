"""Classifiers that take images in [0, 1]: a registry network behind a `Normalize` layer.

Victims, surrogates (FUSE, EM) and benchmarks all build their classifiers here, so perturbations,
filters and exports work in pixel space and normalisation is part of the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fuse_lightning.nets.classifiers import build_classifier

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "Normalize", "classifier_with_normalization"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """Per-channel standardisation as a layer, so every module sees images in [0, 1].

    Keeping normalisation inside the network (not in the data pipeline) lets perturbations,
    filters and exports all work in pixel space.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def classifier_with_normalization(
    arch: str,
    num_classes: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    arch_kwargs: dict | None = None,
) -> nn.Sequential:
    """A registry classifier preceded by a `Normalize` layer: input is an image in [0, 1]."""
    net = build_classifier(arch, num_classes=num_classes, image_size=image_size, **(arch_kwargs or {}))
    return nn.Sequential(Normalize(mean, std), net)
