"""Colour-space helpers for perturbations: luma (what grayscale conversion and JPEG's Y keep).

Pure functions on `(N, C, H, W)` tensors in [0, 1] units; no training code here.
"""

from __future__ import annotations

import torch

# ITU-R 601 luma weights: PIL's `convert("L")`, torchvision's `rgb_to_grayscale` and JPEG's Y.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def luma(x: torch.Tensor) -> torch.Tensor:
    """The ITU-R 601 luma of an RGB batch, shape `(N, 1, H, W)`; single-channel input is returned."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"luma needs 1 or 3 channels, got {x.shape[1]}")
    w = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def gray3(x: torch.Tensor) -> torch.Tensor:
    """Grayscale conversion kept as three equal channels (what an attacker's grayscale filter does)."""
    return luma(x).expand(-1, x.shape[1], -1, -1)


def luma_chroma_delta(raw: torch.Tensor, eps: float, luma_share: float) -> torch.Tensor:
    """A perturbation inside the L-inf ball of radius `eps` with a guaranteed grey component.

    `delta = eps * (a * tanh(luma(raw)) * [1, 1, 1] + (1 - a) * tanh(raw - luma(raw)))` with
    `a = luma_share`. The first part is the same in every channel, so grayscale conversion keeps
    it exactly (the luma weights sum to 1) and JPEG keeps it in the full-resolution Y channel;
    the second is free RGB. `a = 0` is the unconstrained `eps * tanh(raw)` up to the split;
    `a = 1` is a grey perturbation. `|delta| <= eps` holds for every `a` in [0, 1].

    Args:
        raw: Unbounded generator output, `(N, 3, H, W)` (or 1 channel: then `eps * tanh(raw)`).
        eps: L-inf radius in [0, 1] units.
        luma_share: Fraction `a` of the budget reserved for the grey component, in [0, 1].
    """
    if not 0.0 <= luma_share <= 1.0:
        raise ValueError(f"luma_share must be in [0, 1], got {luma_share}")
    if luma_share == 0.0 or raw.shape[1] == 1:
        return eps * torch.tanh(raw)
    grey = luma(raw)
    delta = luma_share * torch.tanh(grey).expand_as(raw)
    if luma_share < 1.0:
        delta = delta + (1.0 - luma_share) * torch.tanh(raw - grey)
    return eps * delta
