"""Radial frequency masks on image batches, computed with the 2-D FFT.

All functions are pure and operate on the last two dimensions of a tensor, so they accept
``(N, C, H, W)``, ``(C, H, W)`` or ``(H, W)`` inputs. Spectra use the *unshifted* layout of
``torch.fft.fft2`` (DC at index ``[0, 0]``).

Frequencies are normalized so that ``r = 1`` is the Nyquist frequency along an axis and the
diagonal corners reach ``r = sqrt(2)``. A cutoff therefore means the same thing at 32x32 and at
224x224.

The module also holds the helpers of Random Spectral Masking (RSM): :func:`sample_band` draws a
random annulus per sample and :func:`remove_band` deletes it from the spectrum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

SQRT2 = math.sqrt(2.0)
MASK_KINDS = ("ideal", "gaussian", "butterworth")


def radial_frequency(
    h: int, w: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Normalized radial frequency of every FFT coefficient of an ``h x w`` image.

    Args:
        h: Image height.
        w: Image width.
        device: Device of the result.
        dtype: Floating dtype of the result.

    Returns:
        Tensor of shape ``(h, w)`` with ``r = sqrt(fy^2 + fx^2)`` where ``fy = 2 * fftfreq(h)`` and
        ``fx = 2 * fftfreq(w)``; ``r = 1`` is the Nyquist frequency of an axis, corners reach
        ``sqrt(2)``.
    """
    fy = 2.0 * torch.fft.fftfreq(h, device=device, dtype=torch.float64)
    fx = 2.0 * torch.fft.fftfreq(w, device=device, dtype=torch.float64)
    # float64 so that exact grid values such as 0.5 compare exactly against cutoffs.
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return r.to(dtype)


def _check_kind(kind: str) -> None:
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds are {', '.join(MASK_KINDS)}")


def _check_cutoff(cutoff: float, name: str = "cutoff") -> None:
    if not 0.0 < float(cutoff) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {cutoff}")


def lowpass_mask(
    h: int,
    w: int,
    cutoff: float,
    kind: str = "ideal",
    order: int = 2,
    device: torch.device | str | None = None,
) -> Tensor:
    """Radial low-pass transfer function.

    Conventions:
        * ``ideal``: 1 where ``r <= cutoff``, else 0. A cutoff of 1 (Nyquist) keeps *every*
          coefficient, including the diagonal corners with ``r`` in ``(1, sqrt(2)]``, so
          ``cutoff=1`` is the identity filter.
        * ``gaussian``: ``exp(-r^2 / (2 cutoff^2))``; the response at ``r = cutoff`` is
          ``exp(-1/2) ~ 0.6065`` (``cutoff`` is the standard deviation, not the half-power point).
        * ``butterworth``: ``1 / (1 + (r / cutoff)^(2 order))``; the response at ``r = cutoff``
          is exactly 0.5.

    Args:
        h: Image height.
        w: Image width.
        cutoff: Cutoff radius in ``(0, 1]``, relative to the Nyquist frequency.
        kind: One of ``ideal``, ``gaussian``, ``butterworth``.
        order: Butterworth order (ignored by the other kinds).
        device: Device of the mask.

    Returns:
        Float32 mask of shape ``(h, w)`` with values in ``[0, 1]``.

    Raises:
        ValueError: If ``cutoff`` is outside ``(0, 1]``, ``kind`` is unknown or ``order < 1``.
    """
    _check_kind(kind)
    _check_cutoff(cutoff)
    r = radial_frequency(h, w, device=device, dtype=torch.float64)
    if kind == "ideal":
        if cutoff >= 1.0:
            mask = torch.ones_like(r)
        else:
            mask = (r <= cutoff).to(r.dtype)
    elif kind == "gaussian":
        mask = torch.exp(-(r**2) / (2.0 * cutoff**2))
    else:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        mask = 1.0 / (1.0 + (r / cutoff) ** (2 * order))
    return mask.to(torch.float32)


def highpass_mask(
    h: int,
    w: int,
    cutoff: float,
    kind: str = "ideal",
    order: int = 2,
    device: torch.device | str | None = None,
) -> Tensor:
    """Radial high-pass transfer function, ``1 - lowpass_mask(...)``.

    Args:
        h: Image height.
        w: Image width.
        cutoff: Cutoff radius in ``(0, 1]``; see :func:`lowpass_mask` for the conventions.
        kind: One of ``ideal``, ``gaussian``, ``butterworth``.
        order: Butterworth order.
        device: Device of the mask.

    Returns:
        Float32 mask of shape ``(h, w)``.
    """
    return 1.0 - lowpass_mask(h, w, cutoff, kind=kind, order=order, device=device)


def bandpass_mask(
    h: int,
    w: int,
    low: float,
    high: float,
    kind: str = "ideal",
    order: int = 2,
    device: torch.device | str | None = None,
) -> Tensor:
    """Radial band-pass transfer function, ``lowpass(high) - lowpass(low)`` clamped to ``[0, 1]``.

    For ``kind="ideal"`` this keeps ``low < r <= high``; ``low = 0`` keeps the DC term as well
    (the low-pass at 0 is taken to be empty).

    Args:
        h: Image height.
        w: Image width.
        low: Lower radius in ``[0, high)``.
        high: Upper radius in ``(low, 1]``.
        kind: One of ``ideal``, ``gaussian``, ``butterworth``.
        order: Butterworth order.
        device: Device of the mask.

    Returns:
        Float32 mask of shape ``(h, w)``.

    Raises:
        ValueError: If not ``0 <= low < high <= 1`` or ``kind`` is unknown.
    """
    _check_kind(kind)
    if not 0.0 <= float(low) < float(high) <= 1.0:
        raise ValueError(f"bandpass needs 0 <= low < high <= 1, got low={low}, high={high}")
    upper = lowpass_mask(h, w, high, kind=kind, order=order, device=device)
    if low == 0:
        return upper
    lower = lowpass_mask(h, w, low, kind=kind, order=order, device=device)
    return (upper - lower).clamp_(0.0, 1.0)


def band_mask(r: Tensor, low: float | Tensor, high: float | Tensor) -> Tensor:
    """Indicator of the annulus ``low <= r < high``.

    Args:
        r: Radial frequencies, e.g. from :func:`radial_frequency`, shape ``(h, w)``.
        low: Inner radius, a float or a tensor broadcastable against ``r`` such as ``(N, 1, 1, 1)``.
        high: Outer radius (exclusive), same conventions as ``low``.

    Returns:
        Mask in ``r.dtype``; shape ``(N, 1, h, w)`` for per-sample ``(N, 1, 1, 1)`` radii.
    """
    return ((r >= low) & (r < high)).to(r.dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Half / bfloat16 FFTs are limited (power-of-two sizes only) and imprecise: use float32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def apply_spectral_mask(x: Tensor, mask: Tensor) -> Tensor:
    """Multiply the 2-D spectrum of ``x`` by ``mask`` and transform back.

    Args:
        x: Images, shape ``(..., H, W)``.
        mask: Real transfer function broadcastable against ``x``, e.g. ``(H, W)`` or ``(N, 1, H, W)``.

    Returns:
        ``ifft2(fft2(x) * mask).real`` in ``x.dtype`` (computed in float32, or float64 for
        float64 inputs).
    """
    dtype = _compute_dtype(x)
    spec = torch.fft.fft2(x.to(dtype))
    out = torch.fft.ifft2(spec * mask.to(device=x.device, dtype=dtype)).real
    return out.to(x.dtype)


def lowpass(x: Tensor, cutoff: float, kind: str = "ideal", order: int = 2) -> Tensor:
    """Low-pass filter images; see :func:`lowpass_mask`.

    Args:
        x: Images, shape ``(..., H, W)``.
        cutoff: Cutoff radius in ``(0, 1]``.
        kind: One of ``ideal``, ``gaussian``, ``butterworth``.
        order: Butterworth order.

    Returns:
        Filtered images, same shape and dtype as ``x``.
    """
    h, w = x.shape[-2:]
    return apply_spectral_mask(x, lowpass_mask(h, w, cutoff, kind, order, device=x.device))


def highpass(x: Tensor, cutoff: float, kind: str = "ideal", order: int = 2) -> Tensor:
    """High-pass filter images; see :func:`highpass_mask`.

    Args:
        x: Images, shape ``(..., H, W)``.
        cutoff: Cutoff radius in ``(0, 1]``.
        kind: One of ``ideal``, ``gaussian``, ``butterworth``.
        order: Butterworth order.

    Returns:
        Filtered images, same shape and dtype as ``x``.
    """
    h, w = x.shape[-2:]
    return apply_spectral_mask(x, highpass_mask(h, w, cutoff, kind, order, device=x.device))


def bandpass(x: Tensor, low: float, high: float, kind: str = "ideal", order: int = 2) -> Tensor:
    """Band-pass filter images; see :func:`bandpass_mask`.

    Args:
        x: Images, shape ``(..., H, W)``.
        low: Lower radius in ``[0, high)``.
        high: Upper radius in ``(low, 1]``.
        kind: One of ``ideal``, ``gaussian``, ``butterworth``.
        order: Butterworth order.

    Returns:
        Filtered images, same shape and dtype as ``x``.
    """
    h, w = x.shape[-2:]
    return apply_spectral_mask(x, bandpass_mask(h, w, low, high, kind, order, device=x.device))


def split_bands(x: Tensor, cutoff: float) -> tuple[Tensor, Tensor]:
    """Split images into an ideal low-pass part and the remainder.

    Args:
        x: Images, shape ``(..., H, W)``.
        cutoff: Cutoff radius in ``(0, 1]``.

    Returns:
        ``(low, high)`` with ``high = x - low`` so that ``low + high`` reproduces ``x``.
    """
    low = lowpass(x, cutoff, kind="ideal")
    return low, x - low


def _check_range(rng: Sequence[float], name: str) -> tuple[float, float]:
    if len(rng) != 2:
        raise ValueError(f"{name} must be a (lo, hi) pair, got {rng!r}")
    lo, hi = float(rng[0]), float(rng[1])
    if not 0.0 <= lo <= hi:
        raise ValueError(f"{name} must satisfy 0 <= lo <= hi, got {rng!r}")
    return lo, hi


def sample_band(
    n: int,
    width_range: Sequence[float] = (0.1, 0.4),
    start_range: Sequence[float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one random annulus per sample for Random Spectral Masking.

    Args:
        n: Number of samples.
        width_range: ``(lo, hi)`` of the uniform band width, ``0 <= lo <= hi`` and ``hi > 0``.
        start_range: ``(lo, hi)`` of the uniform inner radius, ``0 <= lo <= hi``.
        generator: Optional random generator (its device is used for sampling).
        device: Device of the returned tensors.

    Returns:
        ``(start, width)``, two float32 tensors of shape ``(n,)``.

    Raises:
        ValueError: If a range is malformed or the width range is ``(0, 0)``.
    """
    w_lo, w_hi = _check_range(width_range, "width_range")
    s_lo, s_hi = _check_range(start_range, "start_range")
    if w_hi <= 0.0:
        raise ValueError(f"width_range must allow a positive width, got {width_range!r}")
    gen_device = generator.device if generator is not None else device
    u = torch.rand(2, n, generator=generator, device=gen_device)
    width = w_lo + (w_hi - w_lo) * u[0]
    start = s_lo + (s_hi - s_lo) * u[1]
    return start.to(device), width.to(device)


def _per_sample(v: float | Tensor, x: Tensor) -> float | Tensor:
    if isinstance(v, Tensor) and v.numel() > 1:
        # One radius per sample: (N,) -> (N, 1, 1, 1) to broadcast over channels and pixels.
        return v.to(x.device, torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return float(v)


def remove_band(x: Tensor, start: float | Tensor, width: float | Tensor) -> Tensor:
    """Delete the annulus ``[start, start + width)`` from each sample's spectrum (all channels).

    The removed band's spectral energy becomes exactly zero; every coefficient outside it is
    untouched (up to FFT round-off).

    Args:
        x: Images, shape ``(N, C, H, W)`` when radii are per sample, otherwise ``(..., H, W)``.
        start: Inner radius, a float or a tensor of shape ``(N,)``.
        width: Band width, a float or a tensor of shape ``(N,)``.

    Returns:
        Images with the band removed, same shape and dtype as ``x``.
    """
    h, w = x.shape[-2:]
    r = radial_frequency(h, w, device=x.device, dtype=torch.float64)
    lo = _per_sample(start, x)
    hi = lo + _per_sample(width, x)
    return apply_spectral_mask(x, 1.0 - band_mask(r, lo, hi))


def _energy_map(x: Tensor) -> Tensor:
    """``|fft2(x)|^2`` summed over all leading dimensions, shape ``(H, W)``."""
    spec = torch.fft.fft2(x.to(_compute_dtype(x)))
    return spec.abs().pow(2).reshape(-1, *x.shape[-2:]).sum(0)


def radial_power_spectrum(x: Tensor, num_bins: int | None = None) -> tuple[Tensor, Tensor]:
    """Radially binned power spectrum.

    The power ``|fft2(x)|^2 / (H W)`` is averaged over batch and channels, then averaged inside
    ``num_bins`` equal radial bins over ``[0, sqrt(2)]``. Empty bins (possible with many bins on a
    small grid) report 0.

    Args:
        x: Images, shape ``(..., H, W)``.
        num_bins: Number of bins; defaults to ``min(H, W) // 2 + 1``.

    Returns:
        ``(radii, power)``, each of shape ``(num_bins,)``; ``radii`` are bin centers.
    """
    h, w = x.shape[-2:]
    k = num_bins if num_bins is not None else min(h, w) // 2 + 1
    if k < 1:
        raise ValueError(f"num_bins must be >= 1, got {k}")
    n_maps = max(1, x.numel() // (h * w))
    power = (_energy_map(x) / (h * w * n_maps)).flatten()
    r = radial_frequency(h, w, device=x.device, dtype=torch.float64).flatten()
    idx = torch.clamp((r / SQRT2 * k).floor().long(), max=k - 1)
    total = torch.zeros(k, dtype=power.dtype, device=x.device).index_add_(0, idx, power)
    count = torch.zeros(k, dtype=power.dtype, device=x.device).index_add_(
        0, idx, torch.ones_like(power)
    )
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    radii = (torch.arange(k, dtype=torch.float64, device=x.device) + 0.5) * SQRT2 / k
    return radii.to(torch.float32), mean.to(torch.float32)


def band_energy(x: Tensor, edges: Sequence[float]) -> Tensor:
    """Share of the total spectral energy in each radial band.

    Band ``i`` is ``[edges[i], edges[i+1])``; the last band is closed at its top. The shares sum
    to 1 when the edges cover ``[0, sqrt(2)]``, e.g. ``(0, 0.25, 0.5, 1.0, sqrt(2) + 1e-6)``.

    Args:
        x: Images, shape ``(..., H, W)``.
        edges: Increasing band edges, at least two.

    Returns:
        Float32 tensor of shape ``(len(edges) - 1,)``; zeros if ``x`` has no energy.
    """
    edges = [float(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges[:-1], edges[1:], strict=False)):
        raise ValueError(f"edges must be at least two increasing values, got {edges!r}")
    h, w = x.shape[-2:]
    energy = _energy_map(x)
    r = radial_frequency(h, w, device=x.device, dtype=torch.float64)
    shares = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=False)):
        last = i == len(edges) - 2
        inside = (r >= lo) & ((r <= hi) if last else (r < hi))
        shares.append(energy[inside].sum())
    out = torch.stack(shares)
    total = energy.sum()
    if total <= 0:
        return torch.zeros_like(out, dtype=torch.float32)
    return (out / total).to(torch.float32)
