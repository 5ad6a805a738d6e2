"""Radial frequency masks on image batches, computed with the 2-D FFT.

All functions are pure and operate on the last two dimensions of a tensor, so they accept
``(N, C, H, W)``, ``(C, H, W)`` or ``(H, W)`` inputs. Spectra use the *unshifted* layout of
``torch.fft.fft2`` (DC at index ``[0, 0]``).

Frequencies are normalized so that ``r = 1`` is the Nyquist frequency along an axis and the
diagonal corners reach ``r = sqrt(2)``. A cutoff therefore means the same thing at 32x32 and at
224x224.

Soft transfer functions (``gaussian``, ``butterworth``) are parametrised so that the gain at
``r = cutoff`` is exactly 1/2, like the edge of the ideal mask: a cutoff means the same
frequency for every kind.

The module also holds the helpers of Random Spectral Masking (RSM): :func:`sample_band` draws a
random annulus per sample and :func:`remove_band` deletes it from the spectrum. The random-band
attacker uses :func:`index_uniform` / :func:`random_band_starts` to draw one band per image,
reproducibly from the image's index. :func:`gaussian_blur` is the spatial blur attacker, with its
exact transfer function :func:`gaussian_blur_gain`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SQRT2 = math.sqrt(2.0)
LN2 = math.log(2.0)
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
        * ``gaussian``: ``2^(-(r / cutoff)^2) = exp(-ln 2 * r^2 / cutoff^2)``; the gain at
          ``r = cutoff`` is exactly 1/2 (``cutoff`` is the half-gain radius, i.e. a Gaussian of
          standard deviation ``cutoff / sqrt(2 ln 2) ~ 0.849 cutoff``).
        * ``butterworth``: ``1 / (1 + (r / cutoff)^(2 order))``; the gain at ``r = cutoff``
          is exactly 1/2.

        Soft masks decrease monotonically with ``r`` and never reach 0, so they are not the
        identity at ``cutoff = 1`` (the gain at Nyquist is 1/2).

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
        mask = torch.exp(-LN2 * (r / cutoff) ** 2)
    else:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        mask = 1.0 / (1.0 + (r / cutoff) ** (2 * order))
    return mask.to(torch.float32)


def _keep_dc(mask: Tensor, keep_dc: bool) -> Tensor:
    if keep_dc:
        mask = mask.clone()
        mask[..., 0, 0] = 1.0
    return mask


def highpass_mask(
    h: int,
    w: int,
    cutoff: float,
    kind: str = "ideal",
    order: int = 2,
    device: torch.device | str | None = None,
    keep_dc: bool = False,
) -> Tensor:
    """Radial high-pass transfer function, ``1 - lowpass_mask(...)``.

    For ``kind="ideal"`` this removes ``r <= cutoff`` and keeps ``r > cutoff``.

    Args:
        h: Image height.
        w: Image width.
        cutoff: Cutoff radius in ``(0, 1]``; see :func:`lowpass_mask` for the conventions.
        kind: One of ``ideal``, ``gaussian``, ``butterworth``.
        order: Butterworth order.
        device: Device of the mask.
        keep_dc: Pass the DC coefficient (each channel's mean) unchanged, so that a filtered
            image keeps its brightness.

    Returns:
        Float32 mask of shape ``(h, w)``.
    """
    mask = 1.0 - lowpass_mask(h, w, cutoff, kind=kind, order=order, device=device)
    return _keep_dc(mask, keep_dc)


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


def bandstop_mask(
    h: int,
    w: int,
    low: float,
    high: float,
    kind: str = "ideal",
    order: int = 2,
    device: torch.device | str | None = None,
    keep_dc: bool = False,
) -> Tensor:
    """Radial band-stop transfer function, ``1 - bandpass_mask(...)``.

    For ``kind="ideal"`` this removes ``low < r <= high`` (``low = 0`` removes the DC term too,
    unless ``keep_dc``) and keeps everything else: the exact complement of
    :func:`bandpass_mask`. With ``high = 1`` the corners ``r > 1`` are removed as well (the ideal
    low-pass at 1 keeps everything).

    Args:
        h: Image height.
        w: Image width.
        low: Lower radius in ``[0, high)``.
        high: Upper radius in ``(low, 1]``.
        kind: One of ``ideal``, ``gaussian``, ``butterworth``.
        order: Butterworth order.
        device: Device of the mask.
        keep_dc: Pass the DC coefficient unchanged.

    Returns:
        Float32 mask of shape ``(h, w)``.

    Raises:
        ValueError: If not ``0 <= low < high <= 1`` or ``kind`` is unknown.
    """
    mask = 1.0 - bandpass_mask(h, w, low, high, kind=kind, order=order, device=device)
    return _keep_dc(mask, keep_dc)


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


def highpass(
    x: Tensor, cutoff: float, kind: str = "ideal", order: int = 2, keep_dc: bool = False
) -> Tensor:
    """High-pass filter images; see :func:`highpass_mask`.

    Args:
        x: Images, shape ``(..., H, W)``.
        cutoff: Cutoff radius in ``(0, 1]``.
        kind: One of ``ideal``, ``gaussian``, ``butterworth``.
        order: Butterworth order.
        keep_dc: Keep each image's (and channel's) mean.

    Returns:
        Filtered images, same shape and dtype as ``x``.
    """
    h, w = x.shape[-2:]
    mask = highpass_mask(h, w, cutoff, kind, order, device=x.device, keep_dc=keep_dc)
    return apply_spectral_mask(x, mask)


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


def bandstop(
    x: Tensor,
    low: float,
    high: float,
    kind: str = "ideal",
    order: int = 2,
    keep_dc: bool = False,
) -> Tensor:
    """Band-stop filter images; see :func:`bandstop_mask`.

    Args:
        x: Images, shape ``(..., H, W)``.
        low: Lower radius in ``[0, high)``.
        high: Upper radius in ``(low, 1]``.
        kind: One of ``ideal``, ``gaussian``, ``butterworth``.
        order: Butterworth order.
        keep_dc: Keep each image's (and channel's) mean.

    Returns:
        Filtered images, same shape and dtype as ``x``.
    """
    h, w = x.shape[-2:]
    mask = bandstop_mask(h, w, low, high, kind, order, device=x.device, keep_dc=keep_dc)
    return apply_spectral_mask(x, mask)


def gaussian_blur_taps(sigma: float, h: int | None = None, w: int | None = None) -> int:
    """Kernel size of :func:`gaussian_blur`: ``2 ceil(3 sigma) + 1``, at most ``2 min(h, w) - 1``.

    Args:
        sigma: Standard deviation in pixels, ``> 0``.
        h: Image height (caps the size so that reflect padding is possible), optional.
        w: Image width, optional.
    """
    if not float(sigma) > 0.0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    taps = 2 * math.ceil(3.0 * float(sigma)) + 1
    if h is not None and w is not None:
        taps = min(taps, 2 * min(h, w) - 1)
    return taps


def gaussian_kernel1d(sigma: float, taps: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Sampled, normalised 1-D Gaussian: ``exp(-j^2 / (2 sigma^2))`` for ``j = -(taps//2) ..
    taps//2``, divided by its sum (the kernel of ``torchvision``'s ``gaussian_blur``).

    Args:
        sigma: Standard deviation in pixels, ``> 0``.
        taps: Odd kernel size.
        dtype: Floating dtype of the kernel.

    Returns:
        Tensor of shape ``(taps,)`` summing to 1.
    """
    if taps < 1 or taps % 2 == 0:
        raise ValueError(f"taps must be odd and positive, got {taps}")
    j = torch.arange(taps, dtype=torch.float64) - taps // 2
    k = torch.exp(-(j**2) / (2.0 * float(sigma) ** 2))
    return (k / k.sum()).to(dtype)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable spatial Gaussian blur with reflect padding (same result as ``torchvision``).

    Args:
        x: Images, shape ``(..., H, W)``.
        sigma: Standard deviation in pixels, ``> 0``; the kernel has
            :func:`gaussian_blur_taps` taps.

    Returns:
        Blurred images, same shape and dtype as ``x`` (computed in float32, or float64).
    """
    h, w = x.shape[-2:]
    taps = gaussian_blur_taps(sigma, h, w)
    if taps < 3:
        return x.clone()
    dtype = _compute_dtype(x)
    k = gaussian_kernel1d(sigma, taps, dtype).to(x.device)
    pad = taps // 2
    y = F.pad(x.reshape(-1, 1, h, w).to(dtype), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, taps))
    y = F.conv2d(y, k.view(1, 1, taps, 1))
    return y.reshape(x.shape).to(x.dtype)


def gaussian_blur_gain(sigma: float, r: float | Tensor, taps: int | None = None) -> Tensor:
    """Exact gain of :func:`gaussian_blur` at radius ``r`` along an image axis.

    The separable kernel multiplies an axis frequency ``r`` (fraction of Nyquist, so ``pi r``
    radians per pixel) by ``sum_j k_j cos(pi r j)`` and leaves the other axis at gain 1. For
    large ``sigma`` this approaches ``exp(-pi^2 sigma^2 r^2 / 2)``, a Gaussian low-pass with
    half-gain radius ``sqrt(2 ln 2) / (pi sigma) ~ 0.375 / sigma``; small kernels differ: with
    ``sigma = 0.5`` the gain never falls below ~0.57.

    Args:
        sigma: Standard deviation in pixels, ``> 0``.
        r: Radius (or tensor of radii) in ``[0, 1]``.
        taps: Kernel size; default :func:`gaussian_blur_taps` without an image-size cap.

    Returns:
        Float64 tensor of the shape of ``r``.
    """
    taps = gaussian_blur_taps(sigma) if taps is None else taps
    k = gaussian_kernel1d(sigma, taps)
    j = torch.arange(taps, dtype=torch.float64) - taps // 2
    r = torch.as_tensor(r, dtype=torch.float64)
    return (k * torch.cos(math.pi * r.unsqueeze(-1) * j)).sum(-1)


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


def sample_partition_band(
    n: int,
    edges: Sequence[float],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one band per sample from a fixed partition of the radius axis, uniformly.

    Band ``i`` is ``[edges[i], edges[i+1])``. With edges ``(0, 0.25, 0.5, 0.75, 1.5)`` each
    quarter of the spectrum (the last one with the corners) is removed for a quarter of the
    samples: the bands an attacker's ``bandstop-ideal-a-b`` removes.

    Args:
        n: Number of samples.
        edges: Increasing radii, at least two, the first ``>= 0``.
        generator: Optional random generator (its device is used for sampling).
        device: Device of the returned tensors.

    Returns:
        ``(start, width)``, two float32 tensors of shape ``(n,)`` for :func:`remove_band`.

    Raises:
        ValueError: If the edges are not increasing or start below 0.
    """
    e = [float(v) for v in edges]
    if len(e) < 2 or e[0] < 0 or any(b <= a for a, b in zip(e[:-1], e[1:], strict=False)):
        raise ValueError(f"band edges must be at least two increasing radii >= 0, got {list(edges)!r}")
    gen_device = generator.device if generator is not None else device
    pick = torch.randint(len(e) - 1, (n,), generator=generator, device=gen_device).to(device)
    table = torch.tensor(e, dtype=torch.float32, device=device)
    return table[pick], table[pick + 1] - table[pick]


def _per_sample(v: float | Tensor, x: Tensor) -> float | Tensor:
    if isinstance(v, Tensor) and v.numel() > 1:
        # One radius per sample: (N,) -> (N, 1, 1, 1) to broadcast over channels and pixels.
        return v.to(x.device, torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return float(v)


def remove_band(
    x: Tensor, start: float | Tensor, width: float | Tensor, keep_dc: bool = False
) -> Tensor:
    """Delete the annulus ``[start, start + width)`` from each sample's spectrum (all channels).

    The removed band's spectral energy becomes exactly zero; every coefficient outside it is
    untouched (up to FFT round-off).

    Args:
        x: Images, shape ``(N, C, H, W)`` when radii are per sample, otherwise ``(..., H, W)``.
        start: Inner radius, a float or a tensor of shape ``(N,)``.
        width: Band width, a float or a tensor of shape ``(N,)``.
        keep_dc: Never remove the DC coefficient (a band starting at 0 keeps the mean).

    Returns:
        Images with the band removed, same shape and dtype as ``x``.
    """
    h, w = x.shape[-2:]
    r = radial_frequency(h, w, device=x.device, dtype=torch.float64)
    lo = _per_sample(start, x)
    hi = lo + _per_sample(width, x)
    return apply_spectral_mask(x, _keep_dc(1.0 - band_mask(r, lo, hi), keep_dc))


_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15


def _splitmix64(z: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser (Steele, Lea, Flood 2014) on uint64 arrays; overflow wraps by design.
    z = z + np.uint64(_SPLITMIX_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def index_uniform(index: Tensor | Sequence[int], seed: int = 0) -> Tensor:
    """One uniform number in ``[0, 1)`` per index, a pure function of ``(seed, index)``.

    A counter-based generator (splitmix64 of the seed, then of seed hash + index), so the value
    of an image does not depend on the batch it is in, on its position, or on other images.

    Args:
        index: Non-negative integer indices, any shape.
        seed: Non-negative integer seed.

    Returns:
        Float64 tensor of the shape of ``index`` (on its device when it is a tensor).
    """
    idx = index if isinstance(index, Tensor) else torch.as_tensor(index, dtype=torch.int64)
    if idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"index must hold integers, got {idx.dtype}")
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError("index must be non-negative")
    if int(seed) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([int(seed) % 2**64], dtype=np.uint64))
        z = _splitmix64(key + idx.detach().cpu().numpy().astype(np.uint64))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return torch.from_numpy(u).to(idx.device)


def random_band_starts(
    index: Tensor | Sequence[int], width: float, seed: int = 0, top: float = 1.0
) -> Tensor:
    """Inner radius of a band of ``width`` per image, uniform in ``[0, top - width]``.

    The band ``[start, start + width)`` then always lies inside ``[0, top]``.

    Args:
        index: Image indices (non-negative integers).
        width: Band width in ``(0, top)``.
        seed: Seed, see :func:`index_uniform`.
        top: Largest radius a band may reach (1 = Nyquist).

    Returns:
        Float64 tensor of the shape of ``index``.
    """
    if not 0.0 < float(width) < float(top):
        raise ValueError(f"width must be in (0, {top:g}), got {width}")
    return index_uniform(index, seed) * (float(top) - float(width))


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
