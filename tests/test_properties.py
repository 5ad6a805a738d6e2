"""Property tests (hypothesis): masks, filters and the export budget over random shapes and values."""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuse_lightning import spectral  # noqa: E402
from fuse_lightning.budget import quantize_protected  # noqa: E402
from fuse_lightning.filters import apply_filter_uint8, filter_from_name  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None)
sizes = st.integers(min_value=1, max_value=24)
cutoffs = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)
kinds = st.sampled_from(spectral.MASK_KINDS)
orders = st.integers(min_value=1, max_value=6)
float_dtypes = st.sampled_from([torch.float32, torch.float64])
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def images(seed: int, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@SETTINGS
@given(h=sizes, w=sizes, cutoff=cutoffs, kind=kinds, order=orders)
def test_masks_lie_in_unit_interval_and_complement(h, w, cutoff, kind, order):
    low = spectral.lowpass_mask(h, w, cutoff, kind, order)
    high = spectral.highpass_mask(h, w, cutoff, kind, order)
    assert low.shape == (h, w) and low.dtype == torch.float32
    assert torch.isfinite(low).all() and low.min() >= 0 and low.max() <= 1
    assert torch.allclose(low + high, torch.ones_like(low))
    assert low[0, 0] == pytest.approx(1.0)  # the DC term always passes a low-pass


@SETTINGS
@given(h=sizes, w=sizes, cutoff=cutoffs, kind=kinds, order=orders, seed=seeds, dtype=float_dtypes)
def test_filtering_real_images_stays_real_and_keeps_shape_and_dtype(h, w, cutoff, kind, order, seed, dtype):
    x = images(seed, (2, 3, h, w), dtype)
    mask = spectral.lowpass_mask(h, w, cutoff, kind, order).to(torch.float64)
    full = torch.fft.ifft2(torch.fft.fft2(x.double()) * mask)
    assert full.imag.abs().max() <= 1e-9 * max(1.0, float(full.real.abs().max()))  # Hermitian mask
    out = spectral.lowpass(x, cutoff, kind, order)
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
    low, high = spectral.split_bands(x, cutoff)
    assert torch.allclose(low + high, x, atol=1e-5)


@SETTINGS
@given(h=st.integers(4, 24), w=st.integers(4, 24), start=st.floats(0.0, 1.2), width=st.floats(0.05, 0.6), seed=seeds)
def test_remove_band_zeroes_exactly_that_band(h, w, start, width, seed):
    x = images(seed, (1, 3, h, w), torch.float64)
    out = spectral.remove_band(x, start, width)
    r = spectral.radial_frequency(h, w, dtype=torch.float64)
    inside = (r >= start) & (r < start + width)
    spec_in, spec_out = torch.fft.fft2(x), torch.fft.fft2(out)
    assert float(spec_out[..., inside].abs().sum()) <= 1e-9 * h * w
    assert torch.allclose(spec_out[..., ~inside], spec_in[..., ~inside], atol=1e-9 * h * w)


filter_names = st.one_of(
    st.just("none"), st.just("grayscale"),
    st.builds(lambda q: f"jpeg-{q}", st.integers(1, 95)),
    st.builds(lambda k, c: f"lowpass-{k}-{c:.3f}", kinds, st.floats(0.05, 1.0)),
    st.builds(lambda k, c: f"highpass-{k}-{c:.3f}", kinds, st.floats(0.05, 1.0)),
    st.builds(lambda k, lo, wd: f"bandpass-{k}-{lo:.3f}-{min(1.0, lo + wd):.3f}", kinds,
              st.floats(0.0, 0.8), st.floats(0.05, 0.5)),
    st.builds(lambda k, lo, wd: f"bandstop-{k}-{lo:.3f}-{min(1.0, lo + wd):.3f}", kinds,
              st.floats(0.0, 0.8), st.floats(0.05, 0.5)),
    st.builds(lambda wd, s: f"randband-{wd:.3f}-s{s}", st.floats(0.01, 0.95), st.integers(0, 2**40)),
    st.builds(lambda sg: f"gaussblur-{sg:.3f}", st.floats(0.01, 30.0)),
)


@settings(max_examples=40, deadline=None)
@given(name=filter_names, h=st.integers(8, 24), w=st.integers(8, 24), seed=seeds)
def test_every_filter_keeps_range_shape_and_uint8(name, h, w, seed):
    f = filter_from_name(name)
    x = images(seed, (2, 3, h, w))
    out = f(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    stored = apply_filter_uint8((x * 255).round().to(torch.uint8), f)
    assert stored.dtype == torch.uint8 and stored.shape == x.shape
    assert filter_from_name(f.name).name == f.name  # the canonical name is a fixed point


deltas = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1.0, max_value=1.0),
)


@SETTINGS
@given(eps=st.floats(0.0, 255.0), seed=seeds, scale=st.floats(0.0, 1e6), special=st.lists(deltas, min_size=1, max_size=8),
       n=st.integers(1, 40))
def test_export_budget_holds_for_any_delta(eps, seed, scale, special, n):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    delta = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * scale
    delta[: len(special)] = torch.tensor(special[:n], dtype=torch.float64)
    protected = quantize_protected(clean, delta, eps)
    assert protected.dtype == torch.uint8
    assert (protected.int() - clean.int()).abs().max() <= math.floor(eps)
