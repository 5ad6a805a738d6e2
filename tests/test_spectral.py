import math

import pytest
import torch

from fuse_lightning import spectral as sp

torch.set_num_threads(1)


@pytest.fixture
def x():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 16, 20, generator=g, dtype=torch.float64)


def test_radial_frequency_normalization():
    r = sp.radial_frequency(8, 8)
    assert r.shape == (8, 8)
    assert r[0, 0] == 0
    assert r[4, 0] == pytest.approx(1.0)  # Nyquist along y
    assert r[0, 4] == pytest.approx(1.0)
    assert r.max() == pytest.approx(math.sqrt(2))
    # resolution agnostic: same physical frequency at 32 and 224
    assert sp.radial_frequency(32, 32)[8, 0] == pytest.approx(sp.radial_frequency(224, 224)[56, 0])


def test_ideal_lowpass_removes_high_keeps_low(x):
    cutoff = 0.4
    y = sp.lowpass(x, cutoff)
    assert y.dtype == x.dtype and not y.is_complex()
    r = sp.radial_frequency(16, 20, dtype=torch.float64)
    X, Y = torch.fft.fft2(x), torch.fft.fft2(y)
    above = r > cutoff
    assert above.any() and (~above).any()
    leak = Y.abs().pow(2)[..., above].sum() / X.abs().pow(2).sum()
    assert leak < 1e-10
    assert torch.allclose(Y[..., ~above], X[..., ~above], atol=1e-9)


def test_cutoff_one_is_identity(x):
    assert torch.allclose(sp.lowpass(x, 1.0), x, atol=1e-5)
    assert torch.allclose(sp.lowpass(x.float(), 1.0), x.float(), atol=1e-5)
    assert sp.highpass(x, 1.0).abs().max() < 1e-5


def test_soft_mask_responses_at_cutoff():
    # 32 points: 2 * fftfreq gives r = 0.5 exactly at [8, 0].
    g = sp.lowpass_mask(32, 32, 0.5, kind="gaussian")
    b = sp.lowpass_mask(32, 32, 0.5, kind="butterworth", order=3)
    assert g[8, 0].item() == pytest.approx(math.exp(-0.5), abs=1e-6)
    assert b[8, 0].item() == pytest.approx(0.5, abs=1e-6)
    assert g[0, 0] == 1 and b[0, 0] == 1
    assert (g >= 0).all() and (g <= 1).all() and (b >= 0).all() and (b <= 1).all()
    h = sp.highpass_mask(32, 32, 0.5, kind="gaussian")
    assert torch.allclose(h + g, torch.ones_like(g))


def test_mask_validation():
    with pytest.raises(ValueError, match="cutoff"):
        sp.lowpass_mask(8, 8, 0.0)
    with pytest.raises(ValueError, match="cutoff"):
        sp.lowpass_mask(8, 8, 1.5)
    with pytest.raises(ValueError, match="gaussian"):
        sp.lowpass_mask(8, 8, 0.5, kind="box")
    with pytest.raises(ValueError):
        sp.bandpass_mask(8, 8, 0.5, 0.25)


@pytest.mark.parametrize("kind", ["ideal", "gaussian", "butterworth"])
def test_bandpass_plus_lowpass_is_lowpass_high(x, kind):
    lo, hi = 0.25, 0.6
    lhs = sp.bandpass(x, lo, hi, kind) + sp.lowpass(x, lo, kind)
    assert torch.allclose(lhs, sp.lowpass(x, hi, kind), atol=1e-10)


def test_ideal_bandpass_mask_region_and_dc():
    r = sp.radial_frequency(16, 16, dtype=torch.float64)
    m = sp.bandpass_mask(16, 16, 0.25, 0.5)
    assert torch.equal(m.bool(), (r > 0.25) & (r <= 0.5))
    m0 = sp.bandpass_mask(16, 16, 0.0, 0.5)
    assert m0[0, 0] == 1 and torch.equal(m0.bool(), r <= 0.5)


def test_split_bands_sums_exactly(x):
    low, high = sp.split_bands(x.float(), 0.3)
    assert torch.allclose(low + high, x.float(), atol=1e-6)
    assert torch.allclose(high, sp.highpass(x.float(), 0.3), atol=1e-6)
    assert torch.allclose(low, sp.lowpass(x.float(), 0.3))


def test_apply_mask_half_and_shapes():
    x = torch.rand(2, 3, 8, 8).half()
    m = sp.lowpass_mask(8, 8, 0.5)
    y = sp.apply_spectral_mask(x, m)
    assert y.dtype == torch.float16 and y.shape == x.shape
    assert sp.lowpass(torch.rand(8, 8), 0.5).shape == (8, 8)
    assert sp.lowpass(torch.rand(3, 8, 8), 0.5).shape == (3, 8, 8)


def test_band_mask_broadcast():
    r = sp.radial_frequency(8, 8)
    low = torch.tensor([0.0, 0.5]).view(2, 1, 1, 1)
    m = sp.band_mask(r, low, low + 0.25)
    assert m.shape == (2, 1, 8, 8)
    assert torch.equal(m[1, 0].bool(), (r >= 0.5) & (r < 0.75))


def test_remove_band_zeroes_exactly_that_annulus(x):
    start = torch.tensor([0.0, 0.2, 0.5, 0.9], dtype=torch.float64)
    width = torch.tensor([0.3, 0.25, 0.4, 0.6], dtype=torch.float64)
    y = sp.remove_band(x, start, width)
    r = sp.radial_frequency(16, 20, dtype=torch.float64)
    X, Y = torch.fft.fft2(x), torch.fft.fft2(y)
    for i in range(4):
        band = (r >= start[i]) & (r < start[i] + width[i])
        assert band.any()
        assert Y[i][:, band].abs().max() < 1e-10
        assert torch.allclose(Y[i][:, ~band], X[i][:, ~band], atol=1e-9)
    # a float band applies to everything
    y2 = sp.remove_band(x, 0.2, 0.25)
    assert torch.allclose(y2[1], y[1], atol=1e-12)


def test_sample_band_ranges_and_validation():
    g = torch.Generator().manual_seed(1)
    start, width = sp.sample_band(2000, (0.1, 0.4), (0.2, 0.7), generator=g)
    assert start.shape == width.shape == (2000,)
    assert width.min() >= 0.1 and width.max() <= 0.4
    assert start.min() >= 0.2 and start.max() <= 0.7
    assert width.mean().item() == pytest.approx(0.25, abs=0.02)
    g2 = torch.Generator().manual_seed(1)
    assert torch.equal(sp.sample_band(2000, (0.1, 0.4), (0.2, 0.7), generator=g2)[0], start)
    with pytest.raises(ValueError, match="width_range"):
        sp.sample_band(3, (0.4, 0.1))
    with pytest.raises(ValueError, match="width_range"):
        sp.sample_band(3, (0.0, 0.0))
    with pytest.raises(ValueError, match="start_range"):
        sp.sample_band(3, start_range=(-0.1, 0.5))


def test_band_energy_sums_to_one(x):
    edges = (0, 0.25, 0.5, 1.0, math.sqrt(2) + 1e-6)
    e = sp.band_energy(x, edges)
    assert e.shape == (4,)
    assert e.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (e >= 0).all()
    # DC of positive images dominates the lowest band
    assert e[0] > 0.5
    # after an ideal low-pass at 0.5, nothing is left in [0.5+, ...)
    e_low = sp.band_energy(sp.lowpass(x, 0.49), edges)
    assert e_low[2:].sum() < 1e-12


def test_radial_power_spectrum_lowpassed():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 32, 32, generator=g, dtype=torch.float64)
    radii, p = sp.radial_power_spectrum(x)
    assert radii.shape == p.shape == (17,)
    assert radii[0] == pytest.approx(math.sqrt(2) / 34)
    _, p_low = sp.radial_power_spectrum(sp.lowpass(x, 0.5))
    above = radii > 0.5 + math.sqrt(2) / 17
    assert p[above].min() > 1e-4
    assert p_low[above].max() < 1e-12
    # white noise power is flat: mean |X|^2/(HW) = var for non-DC bins
    noise = torch.randn(8, 1, 32, 32, generator=g, dtype=torch.float64)
    _, pn = sp.radial_power_spectrum(noise)
    assert pn[2:].mean().item() == pytest.approx(1.0, rel=0.1)
