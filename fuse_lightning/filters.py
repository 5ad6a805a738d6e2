"""Preprocessing an attacker may apply to protected training images, as ``nn.Module`` filters.

Every filter maps float images in ``[0, 1]`` to images of the same shape, clamped to ``[0, 1]``,
and has a ``name`` used in logs, run ids and result tables. Names are written and read in one
place: :class:`FilterSpec` (``spec.name``) formats them and :func:`parse_filter_name` parses
them back into a :class:`FilterSpec`; :func:`filter_from_name` builds the filter.
:func:`apply_filter_uint8` runs a filter over a whole stored uint8 dataset.

Name patterns (numbers written with ``%g``; radii are fractions of the Nyquist frequency, see
:mod:`fuse_lightning.spectral`):

* ``none``, ``grayscale``, ``jpeg-<quality>``
* ``lowpass-<kind>-<cutoff>``, ``highpass-<kind>-<cutoff>``
* ``bandpass-<kind>-<low>-<high>``, ``bandstop-<kind>-<low>-<high>``
* ``randband-<width>`` (seed 0) or ``randband-<width>-s<seed>``
* ``gaussblur-<sigma>`` (sigma in pixels)
* ``<name>+<name>[+...]``: the filters in order, e.g. ``grayscale+jpeg-10`` (an attacker who
  converts to grayscale and then saves as JPEG)

with ``<kind>`` one of ``ideal``, ``gaussian``, ``butterworth`` (order 2) or
``butterworth<order>``. When parsing, ``gauss`` and ``butter[<order>]`` are accepted for the
kinds and a missing kind means ``ideal``; :attr:`FilterSpec.name` always gives the canonical
spelling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from torch import Tensor, nn
from torchvision.io import decode_jpeg, encode_jpeg

from fuse_lightning import spectral


def to_uint8(x: Tensor) -> Tensor:
    """Images in [0, 1] as saved 8-bit images: rounded to the nearest level and clamped."""
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)


__all__ = [
    "FILTER_PATTERNS",
    "JPEG",
    "BandPass",
    "BandStop",
    "FilterChain",
    "FilterSpec",
    "GaussianBlur",
    "Grayscale",
    "HighPass",
    "ImageFilter",
    "LowPass",
    "NoFilter",
    "RandomBandStop",
    "apply_filter_uint8",
    "filter_from_name",
    "parse_filter_name",
    "to_uint8",
]

@dataclass(frozen=True)
class FilterSpec:
    """Typed description of a filter name: its family and parameters.

    Only the fields of the family are set; the others stay None.

    Attributes:
        family: ``none``, ``grayscale``, ``jpeg``, ``lowpass``, ``highpass``, ``bandpass``,
            ``bandstop``, ``randband``, ``gaussblur`` or ``chain``.
        kind: Transfer function of the radial spectral families: ``ideal``, ``gaussian`` or
            ``butterworth``.
        order: Butterworth order (2 unless written ``butterworth<order>``); None otherwise.
        cutoff: Radius of ``lowpass`` / ``highpass`` (fraction of Nyquist).
        low: Lower radius of ``bandpass`` / ``bandstop``.
        high: Upper radius of ``bandpass`` / ``bandstop``.
        width: Band width of ``randband``.
        seed: Seed of ``randband``.
        quality: JPEG quality.
        sigma: Blur standard deviation of ``gaussblur`` (pixels).
        parts: The filters of a ``chain``, applied in order.
    """

    family: str
    kind: str | None = None
    order: int | None = None
    cutoff: float | None = None
    low: float | None = None
    high: float | None = None
    width: float | None = None
    seed: int | None = None
    quality: int | None = None
    sigma: float | None = None
    parts: tuple[FilterSpec, ...] | None = None

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={v!r}" for k, v in self.__dict__.items() if v is not None and k != "family"
        )
        return f"FilterSpec({self.family!r}" + (f", {fields})" if fields else ")")

    @property
    def band(self) -> tuple[float, float] | None:
        """``(low, high)`` of a band-pass or band-stop filter, else None."""
        if self.low is None or self.high is None:
            return None
        return (self.low, self.high)

    @property
    def kind_token(self) -> str | None:
        """The kind as written in names: ``butterworth<order>`` when the order is not 2."""
        if self.kind == "butterworth" and self.order not in (None, 2):
            return f"butterworth{self.order}"
        return self.kind

    @property
    def name(self) -> str:
        """Canonical name, parsed back by :func:`parse_filter_name`."""
        f = self.family
        if f in ("none", "grayscale"):
            return f
        if f == "jpeg":
            return f"jpeg-{self.quality}"
        if f in ("lowpass", "highpass"):
            return f"{f}-{self.kind_token}-{self.cutoff:g}"
        if f in ("bandpass", "bandstop"):
            return f"{f}-{self.kind_token}-{self.low:g}-{self.high:g}"
        if f == "randband":
            return f"randband-{self.width:g}" + (f"-s{self.seed}" if self.seed else "")
        if f == "gaussblur":
            return f"gaussblur-{self.sigma:g}"
        if f == "chain":
            return "+".join(part.name for part in self.parts)
        raise ValueError(f"unknown filter family {f!r}")

    def build(self) -> ImageFilter:
        """The filter this spec describes (constructor arguments validated there)."""
        f = self.family
        soft = {"kind": self.kind or "ideal", "order": 2 if self.order is None else self.order}
        if f == "none":
            return NoFilter()
        if f == "grayscale":
            return Grayscale()
        if f == "jpeg":
            return JPEG(self.quality)
        if f == "lowpass":
            return LowPass(self.cutoff, **soft)
        if f == "highpass":
            return HighPass(self.cutoff, **soft)
        if f == "bandpass":
            return BandPass(self.low, self.high, **soft)
        if f == "bandstop":
            return BandStop(self.low, self.high, **soft)
        if f == "randband":
            return RandomBandStop(self.width, seed=0 if self.seed is None else self.seed)
        if f == "gaussblur":
            return GaussianBlur(self.sigma)
        if f == "chain":
            return FilterChain([part.build() for part in self.parts])
        raise ValueError(f"unknown filter family {f!r}")


def _spectral_spec(family: str, kind: str, order: int, **params: float) -> FilterSpec:
    return FilterSpec(family, kind=kind, order=order if kind == "butterworth" else None, **params)


class ImageFilter(nn.Module):
    """Base class: ``forward`` applies :meth:`filter` and clamps the result to ``[0, 1]``.

    Inputs are ``(N, C, H, W)`` batches; a single ``(C, H, W)`` image is also accepted so the
    filters can serve as per-sample data transforms. Subclasses describe themselves by
    :attr:`spec`, from which :attr:`name` is derived.

    Filters with ``per_image = True`` (the random-band attacker) treat each image according to
    its index in the dataset: ``forward(x, index)`` passes the indices to ``filter``; without
    ``index`` the images of a batch are numbered ``0 .. N-1``.
    """

    per_image: bool = False

    @property
    def spec(self) -> FilterSpec:
        """Typed description of this filter."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """Short identifier, parsed back by :func:`filter_from_name`."""
        return self.spec.name

    def filter(self, x: Tensor) -> Tensor:
        """Apply the filter to a ``(N, C, H, W)`` batch (no clamping needed)."""
        raise NotImplementedError

    def forward(self, x: Tensor, index: Tensor | int | None = None) -> Tensor:
        single = x.ndim == 3
        if single:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise ValueError(
                f"expected (N, C, H, W) or (C, H, W) images, got shape {tuple(x.shape)}"
            )
        if self.per_image:
            if index is None:
                index = torch.arange(x.shape[0])
            index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
            if index.numel() != x.shape[0]:
                raise ValueError(f"got {index.numel()} indices for {x.shape[0]} images")
            out = self.filter(x, index)
        else:
            out = self.filter(x)
        out = out.clamp(0.0, 1.0)
        return out.squeeze(0) if single else out

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class NoFilter(ImageFilter):
    """Identity: the attacker trains on the images as they are."""

    @property
    def spec(self) -> FilterSpec:
        return FilterSpec("none")

    def filter(self, x: Tensor) -> Tensor:
        return x


class LowPass(ImageFilter):
    """Radial low-pass filter in the FFT domain.

    Name: ``lowpass-<kind>-<cutoff>``, e.g. ``lowpass-ideal-0.25``, ``lowpass-gaussian-0.5``,
    ``lowpass-butterworth-0.5`` (order 2), ``lowpass-butterworth4-0.5``.

    Args:
        cutoff: Cutoff radius in ``(0, 1]`` relative to the Nyquist frequency. ``ideal`` keeps
            ``r <= cutoff`` (1 keeps everything); ``gaussian`` and ``butterworth`` have gain 1/2
            at ``r = cutoff``.
        kind: Transfer function: ``ideal``, ``gaussian`` or ``butterworth``.
        order: Butterworth order (ignored by the other kinds).
    """

    def __init__(self, cutoff: float = 0.5, kind: str = "ideal", order: int = 2) -> None:
        super().__init__()
        spectral.lowpass_mask(2, 2, cutoff, kind, order)  # validate early, at config time
        self.cutoff, self.kind, self.order = float(cutoff), kind, int(order)

    @property
    def spec(self) -> FilterSpec:
        return _spectral_spec("lowpass", self.kind, self.order, cutoff=self.cutoff)

    def filter(self, x: Tensor) -> Tensor:
        return spectral.lowpass(x, self.cutoff, self.kind, self.order)


class HighPass(ImageFilter):
    """Radial high-pass filter in the FFT domain that keeps each image's mean.

    The transfer function is ``1 -`` the matching low-pass, except at DC: the mean of every
    channel passes unchanged, so the result is the image's detail around its own brightness
    (without it, half of a zero-mean detail image would be clamped away). ``ideal`` removes
    ``0 < r <= cutoff`` and keeps ``r > cutoff``.

    Name: ``highpass-<kind>-<cutoff>``, e.g. ``highpass-ideal-0.25``.

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
    def spec(self) -> FilterSpec:
        return _spectral_spec("highpass", self.kind, self.order, cutoff=self.cutoff)

    def filter(self, x: Tensor) -> Tensor:
        return spectral.highpass(x, self.cutoff, self.kind, self.order, keep_dc=True)


class BandPass(ImageFilter):
    """Radial band-pass filter keeping ``low < r <= high`` (``low = 0`` keeps DC).

    Name: ``bandpass-<kind>-<low>-<high>``, e.g. ``bandpass-ideal-0.25-0.5``.

    Args:
        low: Lower radius in ``[0, high)``.
        high: Upper radius in ``(low, 1]``; ``high = 1`` (ideal) keeps the corners ``r > 1``.
        kind: Transfer function: ``ideal``, ``gaussian`` or ``butterworth``.
        order: Butterworth order (ignored by the other kinds).
    """

    def __init__(self, low: float, high: float, kind: str = "ideal", order: int = 2) -> None:
        super().__init__()
        spectral.bandpass_mask(2, 2, low, high, kind, order)
        self.low, self.high, self.kind, self.order = float(low), float(high), kind, int(order)

    @property
    def spec(self) -> FilterSpec:
        return _spectral_spec("bandpass", self.kind, self.order, low=self.low, high=self.high)

    def filter(self, x: Tensor) -> Tensor:
        return spectral.bandpass(x, self.low, self.high, self.kind, self.order)


class BandStop(ImageFilter):
    """Radial band-stop filter: removes ``low < r <= high``, keeps the rest and the mean.

    The complement of :class:`BandPass` with the same radii (``1 - bandpass``), except that the
    DC coefficient (each channel's mean) always passes: ``bandstop-<kind>-0-<c>`` equals
    ``highpass-<kind>-<c>``. For ``low > 0``, band-pass plus band-stop of the same band is the
    identity.

    Name: ``bandstop-<kind>-<low>-<high>``, e.g. ``bandstop-ideal-0.25-0.5``.

    Args:
        low: Lower radius in ``[0, high)``.
        high: Upper radius in ``(low, 1]``; ``high = 1`` (ideal) removes the corners ``r > 1`` too.
        kind: Transfer function: ``ideal``, ``gaussian`` or ``butterworth``.
        order: Butterworth order (ignored by the other kinds).
    """

    def __init__(self, low: float, high: float, kind: str = "ideal", order: int = 2) -> None:
        super().__init__()
        spectral.bandstop_mask(2, 2, low, high, kind, order)
        self.low, self.high, self.kind, self.order = float(low), float(high), kind, int(order)

    @property
    def spec(self) -> FilterSpec:
        return _spectral_spec("bandstop", self.kind, self.order, low=self.low, high=self.high)

    def filter(self, x: Tensor) -> Tensor:
        return spectral.bandstop(x, self.low, self.high, self.kind, self.order, keep_dc=True)


class RandomBandStop(ImageFilter):
    """Removes a random radial band of fixed width from each image, chosen by the image's index.

    Image ``i`` loses the ideal band ``[s_i, s_i + width)`` with ``s_i`` uniform in
    ``[0, 1 - width]`` (so the band lies inside the Nyquist radius), drawn by
    :func:`fuse_lightning.spectral.random_band_starts` from ``(seed, i)`` alone: the same image
    index always loses the same band, whatever the batch, and different indices lose different
    bands. The DC coefficient (each channel's mean) always passes. It mirrors the defender's
    Random Spectral Masking with a fixed width.

    Name: ``randband-<width>`` (seed 0) or ``randband-<width>-s<seed>``.

    Args:
        width: Band width in ``(0, 1)`` (fraction of Nyquist).
        seed: Non-negative seed.
    """

    per_image = True

    def __init__(self, width: float = 0.25, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < float(width) < 1.0:
            raise ValueError(f"width must be in (0, 1), got {width}")
        if int(seed) < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.width, self.seed = float(width), int(seed)

    @property
    def spec(self) -> FilterSpec:
        return FilterSpec("randband", width=self.width, seed=self.seed)

    def band_starts(self, index: Tensor) -> Tensor:
        """Inner radius of the band removed from each image index (float64)."""
        return spectral.random_band_starts(index, self.width, self.seed)

    def filter(self, x: Tensor, index: Tensor) -> Tensor:
        start = self.band_starts(index).to(x.device)
        return spectral.remove_band(x, start, torch.full_like(start, self.width), keep_dc=True)


class GaussianBlur(ImageFilter):
    """Spatial Gaussian blur, separable, with reflect padding at the borders.

    The kernel is the sampled, normalised Gaussian with ``2 ceil(3 sigma) + 1`` taps (at most
    ``2 min(H, W) - 1``), as in ``torchvision``'s ``gaussian_blur``; its exact gain per
    frequency is :func:`fuse_lightning.spectral.gaussian_blur_gain`. For ``sigma >= 1`` the blur
    is close to ``lowpass-gaussian-<c>`` with ``c ~ 0.375 / sigma`` (gain 1/2 at 0.375 for
    sigma 1, at 0.19 for sigma 2); a blur of ``sigma = 0.5`` is mild, its gain stays above
    ~0.57 up to Nyquist.

    Name: ``gaussblur-<sigma>``, e.g. ``gaussblur-1``.

    Args:
        sigma: Standard deviation in pixels, ``> 0``.
    """

    def __init__(self, sigma: float = 1.0) -> None:
        super().__init__()
        spectral.gaussian_blur_taps(sigma)  # validates sigma
        self.sigma = float(sigma)

    @property
    def spec(self) -> FilterSpec:
        return FilterSpec("gaussblur", sigma=self.sigma)

    def filter(self, x: Tensor) -> Tensor:
        return spectral.gaussian_blur(x, self.sigma)


class JPEG(ImageFilter):
    """JPEG compression round trip (encode and decode on CPU, per image).

    Name: ``jpeg-<quality>``, e.g. ``jpeg-10``.

    Args:
        quality: JPEG quality in ``[1, 100]``; lower means stronger compression.
    """

    def __init__(self, quality: int = 10) -> None:
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        self.quality = int(quality)

    @property
    def spec(self) -> FilterSpec:
        return FilterSpec("jpeg", quality=self.quality)

    def filter(self, x: Tensor) -> Tensor:
        if x.shape[1] not in (1, 3):
            raise ValueError(f"JPEG needs 1 or 3 channels, got {x.shape[1]}")
        images = to_uint8(x.detach().float()).cpu()
        encoded = encode_jpeg(list(images), quality=self.quality)
        decoded = torch.stack(decode_jpeg(encoded))
        return decoded.to(device=x.device, dtype=x.dtype) / 255.0


class Grayscale(ImageFilter):
    """ITU-R 601 luma, repeated over the channels so the shape is unchanged. Name: ``grayscale``."""

    @property
    def spec(self) -> FilterSpec:
        return FilterSpec("grayscale")

    def filter(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            return x
        return TF.rgb_to_grayscale(x, num_output_channels=1).expand_as(x).contiguous()


class FilterChain(ImageFilter):
    """Filters applied in order, each result saved as 8-bit images before the next.

    Name: the filters' names joined by ``+``, e.g. ``grayscale+jpeg-10`` (the ISS attacker who
    converts to grayscale and then compresses).

    Args:
        filters: Two or more filters, first applied first.
    """

    def __init__(self, filters: list[ImageFilter]) -> None:
        super().__init__()
        if len(filters) < 2:
            raise ValueError(f"a filter chain needs two or more filters, got {len(filters)}")
        self.filters = nn.ModuleList(filters)
        self.per_image = any(f.per_image for f in filters)

    @property
    def spec(self) -> FilterSpec:
        return FilterSpec("chain", parts=tuple(f.spec for f in self.filters))

    def filter(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        for i, f in enumerate(self.filters):
            x = f(x, index) if f.per_image else f(x)
            if i < len(self.filters) - 1:
                x = to_uint8(x).to(x.dtype) / 255.0  # the attacker saves each step as 8-bit images
        return x


# ---------------------------------------------------------------------------------- parsing

_NUM = r"(\d+(?:\.\d*)?(?:e-?\d+)?)"
# Optional "<kind>-" prefix: canonical kinds and the short aliases gauss / butter[<order>].
_KIND = r"(?:(ideal|gaussian|gauss|butterworth\d*|butter\d*)-)?"

#: Every accepted name pattern, as shown in error messages and docs.
FILTER_PATTERNS = (
    "none",
    "grayscale",
    "jpeg-<quality>",
    "lowpass-<kind>-<cutoff>",
    "highpass-<kind>-<cutoff>",
    "bandpass-<kind>-<low>-<high>",
    "bandstop-<kind>-<low>-<high>",
    "randband-<width>[-s<seed>]",
    "gaussblur-<sigma>",
    "<name>+<name>[+...]",
)
_ACCEPTED = (
    ", ".join(FILTER_PATTERNS)
    + " with <kind> in ideal|gaussian|butterworth|butterworth<order>"
    + " (radii in (0, 1] as fractions of Nyquist, sigma in pixels)"
)


def _parse_kind(token: str | None) -> tuple[str, int]:
    if token is None:
        return "ideal", 2
    for full, alias in (("butterworth", "butterworth"), ("butterworth", "butter")):
        if token.startswith(alias):
            suffix = token[len(alias) :]
            return full, int(suffix) if suffix else 2
    return ("gaussian" if token == "gauss" else token), 2


def _match(s: str) -> FilterSpec | None:
    if s in ("none", "grayscale"):
        return FilterSpec(s)
    if m := re.fullmatch(r"jpeg-(\d+)", s):
        return FilterSpec("jpeg", quality=int(m.group(1)))
    if m := re.fullmatch(rf"(lowpass|highpass)-{_KIND}{_NUM}", s):
        kind, order = _parse_kind(m.group(2))
        return _spectral_spec(m.group(1), kind, order, cutoff=float(m.group(3)))
    if m := re.fullmatch(rf"(bandpass|bandstop)-{_KIND}{_NUM}-{_NUM}", s):
        kind, order = _parse_kind(m.group(2))
        return _spectral_spec(m.group(1), kind, order, low=float(m.group(3)), high=float(m.group(4)))
    if m := re.fullmatch(rf"randband-{_NUM}(?:-s(\d+))?", s):
        return FilterSpec("randband", width=float(m.group(1)), seed=int(m.group(2) or 0))
    if m := re.fullmatch(rf"gaussblur-{_NUM}", s):
        return FilterSpec("gaussblur", sigma=float(m.group(1)))
    return None


def parse_filter_name(name: str) -> FilterSpec:
    """Parse a filter name into a :class:`FilterSpec` (the one parser of filter names).

    Accepts the patterns of :data:`FILTER_PATTERNS` (case-insensitive, surrounding spaces
    ignored, kind aliases ``gauss`` / ``butter[<order>]`` and an omitted kind meaning
    ``ideal``); ``parse_filter_name(name).name`` is the canonical spelling.

    Args:
        name: E.g. ``none``, ``jpeg-10``, ``lowpass-ideal-0.25``, ``bandstop-ideal-0.25-0.5``,
            ``randband-0.25``, ``gaussblur-1``.

    Returns:
        The parsed spec; its parameters are validated as the filter's constructor does.

    Raises:
        ValueError: For an unknown pattern (the message lists the accepted forms) or an
            out-of-range parameter.
    """
    parts = [_match(part.strip()) for part in str(name).strip().lower().split("+")]
    spec = parts[0] if len(parts) == 1 else None if None in parts else FilterSpec("chain", parts=tuple(parts))
    if spec is None:
        raise ValueError(f"unknown filter name {name!r}; accepted forms: {_ACCEPTED}")
    try:
        spec.build()
    except ValueError as exc:
        raise ValueError(f"invalid filter name {name!r}: {exc}") from None
    return spec


def filter_from_name(name: str) -> ImageFilter:
    """Build a filter from its ``name`` (inverse of :attr:`ImageFilter.name`).

    Args:
        name: A name accepted by :func:`parse_filter_name`, e.g. ``none``, ``grayscale``,
            ``jpeg-10``, ``lowpass-ideal-0.25``, ``highpass-gaussian-0.5``,
            ``bandpass-ideal-0.25-0.5``, ``bandstop-ideal-0.25-0.5``,
            ``lowpass-butterworth4-0.5``, ``randband-0.25``, ``gaussblur-1``.

    Returns:
        The corresponding :class:`ImageFilter`.

    Raises:
        ValueError: If the name is not one of the accepted forms.
    """
    return parse_filter_name(name).build()


@torch.no_grad()
def apply_filter_uint8(
    images_uint8: Tensor,
    f: ImageFilter,
    batch_size: int = 1024,
    indices: Tensor | None = None,
) -> Tensor:
    """Filter a stored uint8 dataset chunk by chunk, as an attacker preprocessing saved images.

    Args:
        images_uint8: Images, uint8, shape ``(N, C, H, W)``.
        f: Filter to apply.
        batch_size: Images per chunk.
        indices: Index of every image, shape ``(N,)``, for per-image filters
            (:class:`RandomBandStop`); default ``0 .. N-1``, the position in ``images_uint8``.

    Returns:
        Filtered images, uint8, same shape and device as the input.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        raise ValueError(
            f"expected uint8 (N, C, H, W) images, got {images_uint8.dtype} {tuple(images_uint8.shape)}"
        )
    n = images_uint8.shape[0]
    per_image = getattr(f, "per_image", False)
    if per_image:
        indices = torch.arange(n) if indices is None else torch.as_tensor(indices).reshape(-1)
        if indices.numel() != n:
            raise ValueError(f"got {indices.numel()} indices for {n} images")
    out = torch.empty_like(images_uint8)
    for i in range(0, n, batch_size):
        chunk = images_uint8[i : i + batch_size].float() / 255.0
        y = f(chunk, indices[i : i + batch_size]) if per_image else f(chunk)
        out[i : i + batch_size] = to_uint8(y)
    return out
