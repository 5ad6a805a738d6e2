"""The L-infinity perturbation budget and its exact enforcement in uint8 storage.

Perturbations live in the ``[0, 1]`` image scale during optimization; the budget is quoted in
0-255 units (``eps = 8`` means ``8/255``). Protected images are stored as uint8, where rounding
could push a pixel one level past the budget, so :func:`quantize_protected` clips in integer
arithmetic to guarantee ``|protected - clean| <= eps`` exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def eps_to_unit(eps_255: float) -> float:
    """Convert a budget from 0-255 units to the ``[0, 1]`` image scale.

    Args:
        eps_255: Budget in 0-255 units, e.g. 8.

    Returns:
        ``eps_255 / 255``.
    """
    if eps_255 < 0:
        raise ValueError(f"eps must be >= 0, got {eps_255}")
    return float(eps_255) / 255.0


def perturb(x: Tensor, delta: Tensor) -> Tensor:
    """Add a perturbation and keep the result a valid image.

    Args:
        x: Images in ``[0, 1]``.
        delta: Perturbation broadcastable against ``x``.

    Returns:
        ``clamp(x + delta, 0, 1)``.
    """
    return (x + delta).clamp(0.0, 1.0)


def quantize_protected(clean_uint8: Tensor, delta: Tensor, eps_255: float) -> Tensor:
    """Store ``clean + delta`` as uint8 while honouring the budget exactly.

    ``protected = round(clean + 255 delta)`` is clipped to
    ``[clean - floor(eps_255), clean + floor(eps_255)]`` and to ``[0, 255]`` using integer
    arithmetic, so ``|protected - clean| <= eps_255`` holds in uint8 units for every pixel.

    Args:
        clean_uint8: Clean images, uint8, any shape.
        delta: Perturbation in the ``[0, 1]`` scale, same shape as ``clean_uint8``.
        eps_255: Budget in 0-255 units.

    Returns:
        Protected images, uint8, same shape and device as ``clean_uint8``.

    Raises:
        ValueError: If ``clean_uint8`` is not uint8, shapes differ or ``eps_255 < 0``.
    """
    if clean_uint8.dtype != torch.uint8:
        raise ValueError(f"clean_uint8 must have dtype uint8, got {clean_uint8.dtype}")
    if tuple(clean_uint8.shape) != tuple(delta.shape):
        raise ValueError(
            f"shape mismatch: clean {tuple(clean_uint8.shape)} vs delta {tuple(delta.shape)}"
        )
    if eps_255 < 0:
        raise ValueError(f"eps_255 must be >= 0, got {eps_255}")
    e = int(math.floor(eps_255))
    clean = clean_uint8.to(torch.int32)
    clean_f = clean.to(torch.float64)
    rounded = torch.round(clean_f + 255.0 * delta.to(device=clean.device, dtype=torch.float64))
    # Clamp in float before the int cast: huge/inf deltas would overflow int32; NaN counts as 0.
    rounded = torch.where(torch.isnan(rounded), clean_f, rounded)
    rounded = torch.minimum(torch.maximum(rounded, clean_f - e - 1), clean_f + e + 1)
    protected = torch.minimum(torch.maximum(rounded.to(torch.int32), clean - e), clean + e)
    return protected.clamp(0, 255).to(torch.uint8)


def linf_uint8(a_uint8: Tensor, b_uint8: Tensor) -> int:
    """Largest absolute pixel difference between two uint8 tensors.

    Args:
        a_uint8: First tensor.
        b_uint8: Second tensor, same shape.

    Returns:
        ``max |a - b|`` as a Python int (0 for empty tensors).
    """
    if tuple(a_uint8.shape) != tuple(b_uint8.shape):
        raise ValueError(f"shape mismatch: {tuple(a_uint8.shape)} vs {tuple(b_uint8.shape)}")
    if a_uint8.numel() == 0:
        return 0
    diff = (a_uint8.to(torch.int32) - b_uint8.to(device=a_uint8.device, dtype=torch.int32)).abs()
    return int(diff.max().item())
