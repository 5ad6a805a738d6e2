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
    assert g[8, 0].item() == pytest.approx(0.5, abs=1e-6)  # half-gain convention
    assert b[8, 0].item() == pytest.approx(0.5, abs=1e-6)
    assert g[0, 0] == 1 and b[0, 0] == 1
    assert (g >= 0).all() and (g <= 1).all() and (b >= 0).all() and (b <= 1).all()
    h = sp.highpass_mask(32, 32, 0.5, kind="gaussian")
    assert torch.allclose(h + g, torch.ones_like(g))
    r = sp.radial_frequency(32, 32, dtype=torch.float64)
    assert torch.allclose(g.double(), torch.exp2(-((r / 0.5) ** 2)), atol=1e-7)


@pytest.mark.parametrize("kind, order", [("gaussian", 2), ("butterworth", 2), ("butterworth", 4)])
@pytest.mark.parametrize("cutoff", [0.25, 0.5, 0.75, 1.0])
def test_soft_masks_half_gain_at_cutoff_and_monotone(kind, order, cutoff):
    # 64 points: r = k / 32 on the axis, so cutoffs 0.25 ... 1 fall on grid points.
    m = sp.lowpass_mask(64, 64, cutoff, kind, order).double()
    r = sp.radial_frequency(64, 64, dtype=torch.float64)
    k = round(cutoff * 32)
    assert m[k, 0].item() == pytest.approx(0.5, abs=1e-6) and m[0, k].item() == pytest.approx(0.5, abs=1e-6)
    order = torch.argsort(r.flatten())
    dr, dm = r.flatten()[order].diff(), m.flatten()[order].diff()
    assert (dm[dr == 0] == 0).all()  # radial: one value per radius
    assert (dm <= 0).all()  # decreasing with r ...
    between = (m.flatten()[order][1:] > 1e-6) & (m.flatten()[order][1:] < 1 - 1e-6)
    assert (dm[(dr > 0) & between] < 0).all()  # ... strictly, where float32 does not saturate
    assert ((m[r < cutoff - 1e-9] > 0.5).all() and (m[r > cutoff + 1e-9] < 0.5).all())


def test_ideal_highpass_keep_dc(x):
    cutoff = 0.3
    y = sp.highpass(x, cutoff, keep_dc=True)
    r = sp.radial_frequency(16, 20, dtype=torch.float64)
    X, Y = torch.fft.fft2(x), torch.fft.fft2(y)
    low = (r <= cutoff) & (r > 0)
    assert Y[..., low].abs().max() < 1e-10
    assert torch.allclose(Y[..., r > cutoff], X[..., r > cutoff], atol=1e-9)
    assert torch.allclose(y.mean((-2, -1)), x.mean((-2, -1)), atol=1e-12)  # the mean passes
    assert sp.highpass(x, cutoff).mean((-2, -1)).abs().max() < 1e-12  # without keep_dc it does not
    m = sp.highpass_mask(16, 20, cutoff, "gaussian", keep_dc=True)
    assert m[0, 0] == 1 and torch.equal(m[1:], sp.highpass_mask(16, 20, cutoff, "gaussian")[1:])


def test_ideal_bandstop_is_complement_of_bandpass(x):
    r = sp.radial_frequency(32, 32, dtype=torch.float64)
    m = sp.bandstop_mask(32, 32, 0.25, 0.5)
    assert torch.equal(m.bool(), ~((r > 0.25) & (r <= 0.5)))  # removes 0.25 < r <= 0.5
    x32 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    both = sp.bandstop(x32, 0.25, 0.5) + sp.bandpass(x32, 0.25, 0.5)
    assert torch.allclose(both, x32, atol=1e-12)
    # low = 0: removes DC too, unless keep_dc; with keep_dc it is the DC-keeping high-pass
    assert sp.bandstop_mask(32, 32, 0.0, 0.25)[0, 0] == 0
    assert torch.allclose(sp.bandstop(x, 0.0, 0.3, keep_dc=True), sp.highpass(x, 0.3, keep_dc=True))
    # high = 1 removes the corners beyond Nyquist as well
    assert sp.bandstop_mask(32, 32, 0.75, 1.0)[r > 1].max() == 0
    with pytest.raises(ValueError):
        sp.bandstop_mask(8, 8, 0.5, 0.25)


@pytest.mark.parametrize("kind", ["gaussian", "butterworth"])
def test_soft_bandstop_plus_bandpass_is_identity(x, kind):
    assert torch.allclose(sp.bandstop(x, 0.2, 0.6, kind) + sp.bandpass(x, 0.2, 0.6, kind), x, atol=1e-6)


def test_index_uniform_is_a_pure_function_of_seed_and_index():
    idx = torch.arange(20000)
    u = sp.index_uniform(idx, seed=0)
    assert u.dtype == torch.float64 and u.shape == (20000,)
    assert u.min() >= 0 and u.max() < 1
    assert len(torch.unique(u)) == 20000  # distinct per index
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert (counts - 2000).abs().max() < 200  # uniform: 2000 per bin, +- 4.5 sigma
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    perm = torch.randperm(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sp.index_uniform(idx[perm], seed=0), u[perm])  # no dependence on order
    assert torch.equal(sp.index_uniform([5, 7], seed=0), u[[5, 7]])
    assert torch.equal(sp.index_uniform(idx.view(100, 200), seed=0), u.view(100, 200))
    other = sp.index_uniform(idx, seed=1)
    assert not torch.equal(other, u) and abs(torch.corrcoef(torch.stack([u, other]))[0, 1]) < 0.05
    with pytest.raises(ValueError, match="non-negative"):
        sp.index_uniform([-1])
    with pytest.raises(ValueError, match="integers"):
        sp.index_uniform(torch.tensor([0.5]))


def test_random_band_starts_stay_inside_nyquist():
    s = sp.random_band_starts(torch.arange(5000), 0.25, seed=3)
    assert s.min() >= 0 and (s + 0.25).max() <= 1.0
    assert s.min() < 0.01 and s.max() > 0.74  # covers the whole range
    with pytest.raises(ValueError, match="width"):
        sp.random_band_starts([0], 1.0)


def test_remove_band_keep_dc(x):
    y = sp.remove_band(x, 0.0, 0.3, keep_dc=True)
    assert torch.allclose(y.mean((-2, -1)), x.mean((-2, -1)), atol=1e-12)
    r = sp.radial_frequency(16, 20, dtype=torch.float64)
    inside = (r > 0) & (r < 0.3)
    assert torch.fft.fft2(y)[..., inside].abs().max() < 1e-10


def test_gaussian_blur_matches_torchvision_and_its_gain():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    for sigma in (0.5, 1.0, 2.0):
        taps = sp.gaussian_blur_taps(sigma, 32, 32)
        assert taps == 2 * math.ceil(3 * sigma) + 1
        ref = tvf.gaussian_blur(x, [taps, taps], [sigma, sigma])
        assert torch.allclose(sp.gaussian_blur(x, sigma), ref, atol=1e-5)
    assert sp.gaussian_blur_taps(20.0, 8, 10) == 15  # capped for reflect padding
    assert sp.gaussian_blur(x[:, :, :8, :8], 20.0).shape == (2, 3, 8, 8)
    # exact gain: half at r ~ 0.375 for sigma 1, ~0.19 for sigma 2; sigma 0.5 stays above 0.57
    assert sp.gaussian_blur_gain(1.0, 0.375).item() == pytest.approx(0.5, abs=0.005)
    assert sp.gaussian_blur_gain(2.0, 0.1875).item() == pytest.approx(0.5, abs=0.005)
    assert sp.gaussian_blur_gain(0.5, 1.0).item() == pytest.approx(0.574, abs=0.001)
    r = torch.linspace(0, 1, 51)
    for sigma in (0.5, 1.0, 2.0):
        gain = sp.gaussian_blur_gain(sigma, r)
        assert gain[0].item() == pytest.approx(1.0)
        # decreasing until the truncated kernel's ripple (|gain| < 1e-3) takes over
        big = gain > 1e-3
        assert (gain[big].diff() < 0).all() and (gain[~big].abs() < 1e-3).all()
    # large sigma: close to the Gaussian low-pass with half-gain radius sqrt(2 ln 2) / (pi sigma)
    c = math.sqrt(2 * math.log(2)) / (math.pi * 3.0)
    assert sp.gaussian_blur_gain(3.0, c).item() == pytest.approx(0.5, abs=5e-3)  # 3-sigma truncation
    with pytest.raises(ValueError, match="sigma"):
        sp.gaussian_blur_taps(0.0)


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


def test_sample_partition_band_draws_each_band_of_the_partition():
    edges = (0.0, 0.25, 0.5, 0.75, 1.5)
    gen = torch.Generator().manual_seed(0)
    start, width = sp.sample_partition_band(4000, edges, generator=gen)
    pairs = {(round(float(s), 6), round(float(s + w), 6)) for s, w in zip(start, width, strict=True)}
    assert pairs == {(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.5)}
    counts = torch.bincount((start * 4).round().long(), minlength=4).double() / 4000
    assert torch.allclose(counts, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03)
    # removing the drawn band leaves exactly zero energy in it and keeps every other band
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    s, w = sp.sample_partition_band(8, edges, generator=gen)
    out = sp.remove_band(x, s, w)
    r = sp.radial_frequency(32, 32, dtype=torch.float64)
    for i in range(8):
        inside = (r >= s[i]) & (r < s[i] + w[i])
        spec_out, spec_in = torch.fft.fft2(out[i]), torch.fft.fft2(x[i])
        assert spec_out[:, inside].abs().max() < 1e-9
        assert torch.allclose(spec_out[:, ~inside], spec_in[:, ~inside], atol=1e-9)
    for bad in ((0.5,), (0.0, 0.5, 0.5), (-0.1, 0.5)):
        with pytest.raises(ValueError, match="band edges"):
            sp.sample_partition_band(2, bad)
