"""Preprocessing an attacker may apply to protected training images, as ``nn.Module`` filters.

Every filter maps float images in ``[0, 1]`` to images of the same shape, clamped to ``[0, 1]``,
and has a ``name`` used in logs and result tables. :func:`filter_from_name` parses such names
back, and :func:`apply_filter_uint8` runs a filter over a whole stored uint8 dataset.
"""

from __future__ import annotations

import re

import torch
import torchvision.transforms.functional as TF
from torch import Tensor, nn
from torchvision.io import decode_jpeg, encode_jpeg

from fuse_lightning import spectral


class ImageFilter(nn.Module):
    """Base class: ``forward`` applies :meth:`filter` and clamps the result to ``[0, 1]``.

    Inputs are ``(N, C, H, W)`` batches; a single ``(C, H, W)`` image is also accepted so the
    filters can serve as per-sample data transforms.
    """

    @property
    def name(self) -> str:
        """Short identifier, parsed back by :func:`filter_from_name`."""
        raise NotImplementedError

    def filter(self, x: Tensor) -> Tensor:
        """Apply the filter to a ``(N, C, H, W)`` batch (no clamping needed)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        single = x.ndim == 3
        if single:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise ValueError(
                f"expected (N, C, H, W) or (C, H, W) images, got shape {tuple(x.shape)}"
            )
        out = self.filter(x).clamp(0.0, 1.0)
        return out.squeeze(0) if single else out

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class NoFilter(ImageFilter):
    """Identity: the attacker trains on the images as they are."""

    @property
    def name(self) -> str:
        return "none"

    def filter(self, x: Tensor) -> Tensor:
        return x


def _kind_token(kind: str, order: int) -> str:
    # Butterworth order is part of the name only when it differs from the default (2).
    if kind == "butterworth" and order != 2:
        return f"butterworth{order}"
    return kind


class LowPass(ImageFilter):
    """Radial low-pass filter in the FFT domain.

    Args:
        cutoff: Cutoff radius in ``(0, 1]`` relative to the Nyquist frequency (1 keeps everything).
        kind: Transfer function: ``ideal``, ``gaussian`` or ``butterworth``.
        order: Butterworth order (ignored by the other kinds).
    """

    def __init__(self, cutoff: float = 0.5, kind: str = "ideal", order: int = 2) -> None:
        super().__init__()
        spectral.lowpass_mask(2, 2, cutoff, kind, order)  # validate early, at config time
        self.cutoff, self.kind, self.order = float(cutoff), kind, int(order)

    @property
    def name(self) -> str:
        return f"lowpass-{_kind_token(self.kind, self.order)}-{self.cutoff:g}"

    def filter(self, x: Tensor) -> Tensor:
        return spectral.lowpass(x, self.cutoff, self.kind, self.order)


class HighPass(ImageFilter):
    """Radial high-pass filter in the FFT domain (``1 -`` the matching low-pass).

    Args:
        cutoff: Cutoff radius in ``(0, 1]`` relative to the Nyquist frequency.
        kind: Transfer function: ``ideal``, ``gaussian`` or ``butterworth``.
        order: Butterworth order (ignored by the other kinds).
    """

    def __init__(self, cutoff: float = 0.5, kind: str = "ideal", order: int = 2) -> None:
        super().__init__()
        spectral.highpass_mask(2, 2, cutoff, kind, order)
        self.cutoff, self.kind, self.order = float(cutoff), kind, int(order)

    @property
    def name(self) -> str:
        return f"highpass-{_kind_token(self.kind, self.order)}-{self.cutoff:g}"

    def filter(self, x: Tensor) -> Tensor:
        return spectral.highpass(x, self.cutoff, self.kind, self.order)


class BandPass(ImageFilter):
    """Radial band-pass filter keeping ``low < r <= high`` (``low = 0`` keeps DC).

    Args:
        low: Lower radius in ``[0, high)``.
        high: Upper radius in ``(low, 1]``.
        kind: Transfer function: ``ideal``, ``gaussian`` or ``butterworth``.
        order: Butterworth order (ignored by the other kinds).
    """

    def __init__(self, low: float, high: float, kind: str = "ideal", order: int = 2) -> None:
        super().__init__()
        spectral.bandpass_mask(2, 2, low, high, kind, order)
        self.low, self.high, self.kind, self.order = float(low), float(high), kind, int(order)

    @property
    def name(self) -> str:
        return f"bandpass-{_kind_token(self.kind, self.order)}-{self.low:g}-{self.high:g}"

    def filter(self, x: Tensor) -> Tensor:
        return spectral.bandpass(x, self.low, self.high, self.kind, self.order)


class JPEG(ImageFilter):
    """JPEG compression round trip (encode and decode on CPU, per image).

    Args:
        quality: JPEG quality in ``[1, 100]``; lower means stronger compression.
    """

    def __init__(self, quality: int = 10) -> None:
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        self.quality = int(quality)

    @property
    def name(self) -> str:
        return f"jpeg-{self.quality}"

    def filter(self, x: Tensor) -> Tensor:
        if x.shape[1] not in (1, 3):
            raise ValueError(f"JPEG needs 1 or 3 channels, got {x.shape[1]}")
        images = (x.detach().float() * 255.0).round().clamp(0, 255).to(torch.uint8).cpu()
        encoded = encode_jpeg(list(images), quality=self.quality)
        decoded = torch.stack(decode_jpeg(encoded))
        return decoded.to(device=x.device, dtype=x.dtype) / 255.0


class Grayscale(ImageFilter):
    """ITU-R 601 luma, repeated over the channels so the shape is unchanged."""

    @property
    def name(self) -> str:
        return "grayscale"

    def filter(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            return x
        return TF.rgb_to_grayscale(x, num_output_channels=1).expand_as(x).contiguous()


_NUM = r"(\d+(?:\.\d*)?(?:e-?\d+)?)"
_KIND = r"(ideal|gaussian|butterworth\d*)"
_ACCEPTED = (
    "none, grayscale, jpeg-<quality>, lowpass-<kind>-<cutoff>, highpass-<kind>-<cutoff>, "
    "bandpass-<kind>-<low>-<high> with kind in ideal|gaussian|butterworth|butterworth<order>"
)


def _parse_kind(token: str) -> tuple[str, int]:
    if token.startswith("butterworth"):
        suffix = token[len("butterworth") :]
        return "butterworth", int(suffix) if suffix else 2
    return token, 2


def filter_from_name(name: str) -> ImageFilter:
    """Build a filter from its ``name`` (inverse of :attr:`ImageFilter.name`).

    Args:
        name: E.g. ``none``, ``grayscale``, ``jpeg-10``, ``lowpass-ideal-0.25``,
            ``highpass-gaussian-0.5``, ``bandpass-ideal-0.25-0.5``, ``lowpass-butterworth4-0.5``.

    Returns:
        The corresponding :class:`ImageFilter`.

    Raises:
        ValueError: If the name is not one of the accepted forms.
    """
    s = name.strip().lower()
    if s == "none":
        return NoFilter()
    if s == "grayscale":
        return Grayscale()
    if m := re.fullmatch(r"jpeg-(\d+)", s):
        return JPEG(int(m.group(1)))
    if m := re.fullmatch(rf"(lowpass|highpass)-{_KIND}-{_NUM}", s):
        kind, order = _parse_kind(m.group(2))
        cls = LowPass if m.group(1) == "lowpass" else HighPass
        return cls(float(m.group(3)), kind, order)
    if m := re.fullmatch(rf"bandpass-{_KIND}-{_NUM}-{_NUM}", s):
        kind, order = _parse_kind(m.group(1))
        return BandPass(float(m.group(2)), float(m.group(3)), kind, order)
    raise ValueError(f"unknown filter name {name!r}; accepted forms: {_ACCEPTED}")


@torch.no_grad()
def apply_filter_uint8(images_uint8: Tensor, f: ImageFilter, batch_size: int = 1024) -> Tensor:
    """Filter a stored uint8 dataset chunk by chunk, as an attacker preprocessing saved images.

    Args:
        images_uint8: Images, uint8, shape ``(N, C, H, W)``.
        f: Filter to apply.
        batch_size: Images per chunk.

    Returns:
        Filtered images, uint8, same shape and device as the input.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        raise ValueError(
            f"expected uint8 (N, C, H, W) images, got {images_uint8.dtype} {tuple(images_uint8.shape)}"
        )
    out = torch.empty_like(images_uint8)
    for i in range(0, images_uint8.shape[0], batch_size):
        chunk = images_uint8[i : i + batch_size].float() / 255.0
        out[i : i + batch_size] = (f(chunk) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return out
