"""Random noise: the control baseline that should *not* make data unlearnable."""

from __future__ import annotations

import torch

from fuse_lightning.baselines.base import Perturbation, seeded_per_index

__all__ = ["RandomNoise"]


class RandomNoise(Perturbation):
    """I.i.d. uniform noise in [-eps, eps] per pixel, fixed per training image.

    Random noise of the same budget carries no class information, so a network trained on it
    reaches (nearly) clean accuracy; it is the control against which unlearnable examples are
    judged (Huang et al., ICLR 2021, Table 1). Its spectrum is flat (white noise): the same
    energy at every spatial frequency.

    Args:
        eps: L-infinity budget in 0-255 units; the noise is uniform in [-eps/255, eps/255].
        seed: Seed; the noise of an image depends only on `(seed, index)`.
    """

    name = "random_noise"

    def __init__(self, eps: float = 8.0, seed: int = 0) -> None:
        super().__init__(eps=eps, seed=seed)

    def perturb_fn(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        u = seeded_per_index(self.seed, indices.cpu(), tuple(images.shape[1:]), "uniform")
        delta = (2 * u - 1) * (self.eps / 255)
        return delta.to(device=images.device, dtype=images.dtype)
