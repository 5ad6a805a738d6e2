import math

import pytest
import torch

from fuse_lightning import filters as fl
from fuse_lightning import spectral as sp

torch.set_num_threads(1)


@pytest.fixture
def x():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 16, 16, generator=g)


@pytest.mark.parametrize(
    "f",
    [
        fl.NoFilter(),
        fl.LowPass(0.25),
        fl.LowPass(0.5, "gaussian"),
        fl.LowPass(0.5, "butterworth", 4),
        fl.HighPass(0.5),
        fl.HighPass(0.25, "gaussian"),
        fl.BandPass(0.25, 0.5),
        fl.BandStop(0.25, 0.5),
        fl.BandStop(0.0, 0.5, "butterworth", 4),
        fl.RandomBandStop(0.25),
        fl.GaussianBlur(0.5),
        fl.GaussianBlur(2.0),
        fl.JPEG(10),
        fl.Grayscale(),
    ],
    ids=lambda f: f.name,
)
def test_outputs_in_range_and_shape(f, x):
    y = f(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1
    assert f(x[0]).shape == x[0].shape  # per-sample transform use
    assert fl.filter_from_name(f.name).name == f.name


def test_lowpass_filter_matches_spectral(x):
    y = fl.LowPass(0.25)(x)
    ref = sp.lowpass(x, 0.25).clamp(0, 1)
    assert torch.allclose(y, ref)
    assert not torch.allclose(y, x, atol=1e-2)
    assert torch.allclose(fl.LowPass(1.0)(x), x, atol=1e-5)


def test_jpeg_changes_image_and_quality_matters(x):
    smooth = sp.lowpass(x, 0.3).clamp(0, 1)
    err10 = (fl.JPEG(10)(smooth) - smooth).abs().mean()
    err95 = (fl.JPEG(95)(smooth) - smooth).abs().mean()
    assert err95 < err10
    assert err10 > 1e-3
    with pytest.raises(ValueError):
        fl.JPEG(0)
    with pytest.raises(ValueError):
        fl.JPEG(101)


def test_grayscale_luma(x):
    y = fl.Grayscale()(x)
    luma = 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        assert torch.allclose(y[:, c], luma, atol=1e-5)


# One canonical name per family and kind; every one must survive name -> filter -> name.
CANONICAL_NAMES = [
    "none",
    "grayscale+jpeg-10",
    "randband-0.25-s1+lowpass-ideal-0.5",
    "grayscale",
    "jpeg-10",
    "lowpass-ideal-0.25",
    "lowpass-gaussian-0.5",
    "lowpass-butterworth-0.5",
    "lowpass-butterworth4-0.5",
    "highpass-ideal-0.25",
    "highpass-gaussian-0.5",
    "highpass-butterworth3-0.5",
    "bandpass-ideal-0.25-0.5",
    "bandpass-gaussian-0-0.25",
    "bandstop-ideal-0.25-0.5",
    "bandstop-gaussian-0.5-0.75",
    "bandstop-butterworth-0-0.25",
    "bandstop-butterworth4-0.75-1",
    "randband-0.25",
    "randband-0.1-s7",
    "gaussblur-0.5",
    "gaussblur-1",
    "gaussblur-2",
]


def test_names():
    assert fl.NoFilter().name == "none"
    assert fl.LowPass(0.5).name == "lowpass-ideal-0.5"
    assert fl.LowPass(1.0, "gaussian").name == "lowpass-gaussian-1"
    assert fl.BandPass(0.25, 0.5).name == "bandpass-ideal-0.25-0.5"
    assert fl.BandStop(0.25, 0.5).name == "bandstop-ideal-0.25-0.5"
    assert fl.HighPass(0.25).name == "highpass-ideal-0.25"
    assert fl.RandomBandStop(0.25).name == "randband-0.25"
    assert fl.RandomBandStop(0.25, seed=3).name == "randband-0.25-s3"
    assert fl.GaussianBlur(1.0).name == "gaussblur-1"
    assert fl.JPEG(10).name == "jpeg-10"
    f = fl.filter_from_name("lowpass-butterworth4-0.5")
    assert isinstance(f, fl.LowPass) and f.order == 4 and f.cutoff == 0.5


@pytest.mark.parametrize("name", CANONICAL_NAMES)
def test_every_name_round_trips(name):
    spec = fl.parse_filter_name(name)
    f = fl.filter_from_name(name)
    assert spec.name == name and f.name == name and f.spec == spec
    assert fl.filter_from_name(f.name).spec == f.spec
    assert fl.parse_filter_name(f" {name.upper()} ").name == name  # case and spaces ignored


def test_every_pattern_and_family_is_covered():
    families = {fl.parse_filter_name(n).family for n in CANONICAL_NAMES}
    assert families == {"chain" if "+" in p else p.split("-")[0] for p in fl.FILTER_PATTERNS}
    classes = {type(fl.filter_from_name(n)) for n in CANONICAL_NAMES}
    exported = {getattr(fl, n) for n in fl.__all__}
    assert classes == {c for c in exported if isinstance(c, type) and issubclass(c, fl.ImageFilter)} - {
        fl.ImageFilter
    }


def test_to_uint8_rounds_to_the_nearest_level_and_clamps():
    x = torch.tensor([-0.2, 0.0, 0.49 / 255, 0.51 / 255, 100.4 / 255, 1.0, 1.3])
    assert fl.to_uint8(x).tolist() == [0, 0, 0, 1, 100, 255, 255]
    assert fl.to_uint8(x).dtype == torch.uint8


def test_a_chain_applies_its_filters_in_order_saving_8_bit_images(x):
    chain = fl.filter_from_name("grayscale+jpeg-10")
    assert isinstance(chain, fl.FilterChain) and not chain.per_image
    grey = (fl.Grayscale()(x) * 255).round() / 255
    assert torch.equal(chain(x), fl.JPEG(10)(grey))
    assert torch.equal(chain(x)[:, 0], chain(x)[:, 2])  # JPEG of a grey image stays grey
    # Order matters: JPEG first leaves JPEG's chroma error in the grey image, not the reverse.
    assert not torch.equal(fl.filter_from_name("jpeg-10+grayscale")(x), chain(x))
    per_image = fl.filter_from_name("randband-0.25+grayscale")
    assert per_image.per_image
    idx = torch.tensor([5, 9, 2, 7])[: x.shape[0]]
    saved = fl.to_uint8(fl.RandomBandStop(0.25)(x, idx)).float() / 255  # clamped, as a PNG is
    assert torch.equal(per_image(x, idx), fl.Grayscale()(saved))
    with pytest.raises(ValueError, match="two or more"):
        fl.FilterChain([fl.Grayscale()])
    with pytest.raises(ValueError, match="unknown filter name 'grayscale\\+jpg-10'"):
        fl.parse_filter_name("grayscale+jpg-10")


def test_spec_fields():
    s = fl.parse_filter_name("bandstop-butterworth4-0.25-0.5")
    assert (s.family, s.kind, s.order, s.band, s.cutoff) == ("bandstop", "butterworth", 4, (0.25, 0.5), None)
    s = fl.parse_filter_name("lowpass-gaussian-0.5")
    assert (s.family, s.kind, s.order, s.cutoff, s.band) == ("lowpass", "gaussian", None, 0.5, None)
    assert fl.parse_filter_name("randband-0.25-s3") == fl.FilterSpec("randband", width=0.25, seed=3)
    assert fl.parse_filter_name("gaussblur-2").sigma == 2.0
    assert fl.parse_filter_name("jpeg-10").quality == 10
    assert repr(fl.parse_filter_name("jpeg-10")) == "FilterSpec('jpeg', quality=10)"


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("lowpass-gauss-0.5", "lowpass-gaussian-0.5"),
        ("lowpass-butter-0.5", "lowpass-butterworth-0.5"),
        ("lowpass-butter4-0.5", "lowpass-butterworth4-0.5"),
        ("lowpass-butterworth2-0.5", "lowpass-butterworth-0.5"),
        ("bandstop-0.25-0.5", "bandstop-ideal-0.25-0.5"),
        ("highpass-0.25", "highpass-ideal-0.25"),
        ("lowpass-ideal-0.50", "lowpass-ideal-0.5"),
        ("randband-0.25-s0", "randband-0.25"),
        ("gaussblur-1.0", "gaussblur-1"),
    ],
)
def test_aliases_parse_to_the_canonical_name(alias, canonical):
    assert fl.parse_filter_name(alias).name == canonical
    assert fl.filter_from_name(alias).name == canonical


@pytest.mark.parametrize(
    "bad",
    [
        "", "lowpass", "lowpass-box-0.5", "jpeg-x", "blur-3", "lowpass-ideal-2", "jpeg-0",
        "bandstop-ideal-0.5-0.25", "bandstop-ideal-0.25", "bandstop-ideal-0.5-1.5", "randband-0",
        "randband-1", "randband-0.25-s-1", "randband-0.25-3", "gaussblur-0", "gaussblur",
        "lowpass-butterworth0-0.5", "highpass-ideal-0",
    ],
)
def test_bad_names_raise(bad):
    with pytest.raises(ValueError):
        fl.filter_from_name(bad)


def test_bad_name_message_lists_forms():
    with pytest.raises(ValueError, match="accepted forms") as info:
        fl.filter_from_name("blur-3")
    for pattern in fl.FILTER_PATTERNS:
        assert pattern in str(info.value)
    with pytest.raises(ValueError, match="invalid filter name 'randband-1': width"):
        fl.filter_from_name("randband-1")


# ------------------------------------------------------------------ energy of the attackers


def _energy(x: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Spectral energy of each image (all channels) on the coefficients of ``region``."""
    return torch.fft.fft2(x.double()).abs().pow(2)[..., region].sum((-1, -2))


@pytest.fixture
def mid():
    # Random images in [0.25, 0.75]: filtered values stay in [0, 1], so clamping does not blur
    # the energy bookkeeping.
    g = torch.Generator().manual_seed(7)
    return 0.25 + 0.5 * torch.rand(6, 3, 32, 32, generator=g)


def _assert_removes(x, y, removed, tol=0.01):
    kept = ~removed
    kept[0, 0] = False  # DC checked separately
    assert (_energy(y, removed) <= tol * _energy(x, removed)).all()
    ratio = _energy(y, kept) / _energy(x, kept)
    assert ((ratio - 1).abs() <= tol).all(), ratio
    scale = float(x.max())  # 1 for float images, 255 for uint8 ones
    assert torch.allclose(y.double().mean((-2, -1)), x.double().mean((-2, -1)), atol=1e-3 * scale)


@pytest.mark.parametrize("low, high", [(0.25, 0.5), (0.3, 0.55), (0.0, 0.25), (0.75, 1.0)])
def test_bandstop_removes_the_band_and_keeps_the_rest(mid, low, high):
    r = sp.radial_frequency(32, 32, dtype=torch.float64)
    removed = (r > low) & (r <= high) & (r > 0)  # low < r <= high; DC always kept
    if high == 1.0:
        removed |= r > 1  # an ideal edge at Nyquist takes the corners with it
    f = fl.BandStop(low, high)
    _assert_removes(mid, f(mid), removed)
    # the same through the stored-uint8 path (8-bit rounding adds ~1e-5 of the band's energy)
    x8 = (mid * 255).round().to(torch.uint8)
    _assert_removes(x8.float(), fl.apply_filter_uint8(x8, f).float(), removed)
    # with grid-free edges, "[a, a + w)" and "(a, a + w]" are the same set
    if (low, high) == (0.3, 0.55):
        assert torch.equal(removed, (r >= low) & (r < high))


def test_highpass_removes_below_cutoff(mid):
    r = sp.radial_frequency(32, 32, dtype=torch.float64)
    for cutoff in (0.25, 0.5):
        _assert_removes(mid, fl.HighPass(cutoff)(mid), (r <= cutoff) & (r > 0))
    assert torch.allclose(fl.BandStop(0.0, 0.25)(mid), fl.HighPass(0.25)(mid), atol=1e-6)


def _cosine_gain(f, k: int, n: int = 32, margin: int = 0) -> float:
    """Gain of filter ``f`` on a horizontal cosine at radius ``r = 2 k / n``.

    ``margin`` columns on each side are left out (border effects of spatial filters).
    """
    t = torch.arange(n, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * k * t / n).expand(n, n)
    x = (0.5 + 0.25 * wave).expand(1, 3, n, n)
    y = f(x.float()).double() - 0.5
    cols = slice(margin, n - margin)
    w = wave[:, cols]
    return float((y[..., cols] * w).sum() / (0.25 * w.pow(2).sum() * 3))


@pytest.mark.parametrize("kind, order", [("gaussian", 2), ("butterworth", 2), ("butterworth", 4)])
@pytest.mark.parametrize("cutoff", [0.25, 0.5, 0.75])
def test_soft_lowpass_gain_is_half_at_cutoff_and_decreasing(kind, order, cutoff):
    f = fl.LowPass(cutoff, kind, order)
    gains = [_cosine_gain(f, k) for k in range(17)]  # r = k / 16
    assert gains[round(cutoff * 16)] == pytest.approx(0.5, abs=1e-4)
    assert gains[0] == pytest.approx(1.0, abs=1e-6)
    assert all(b < a for a, b in zip(gains, gains[1:], strict=False))
    hp = fl.HighPass(cutoff, kind, order)
    assert _cosine_gain(hp, round(cutoff * 16)) == pytest.approx(0.5, abs=1e-4)


def test_gaussblur_two_strengths():
    # sigma 1 halves r = 0.375 (k = 6 at n = 32); sigma 2 is stronger at every frequency
    weak, strong = fl.GaussianBlur(1.0), fl.GaussianBlur(2.0)
    assert _cosine_gain(weak, 6, margin=6) == pytest.approx(0.5, abs=0.01)
    for k in (2, 4, 8):
        measured = _cosine_gain(weak, k, margin=6)
        assert measured == pytest.approx(sp.gaussian_blur_gain(1.0, k / 16).item(), abs=0.01)
        assert _cosine_gain(strong, k, margin=6) < measured
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    hi = sp.radial_frequency(32, 32) > 0.5
    e = [_energy(f(x), hi).sum() for f in (fl.NoFilter(), fl.GaussianBlur(0.5), weak, strong)]
    assert e[0] > e[1] > e[2] > e[3]
    assert torch.allclose(weak(x).mean(), x.mean(), atol=1e-3)  # a blur keeps the brightness


def test_random_band_is_deterministic_per_image_index(mid):
    f = fl.RandomBandStop(0.25, seed=0)
    idx = torch.tensor([3, 10, 11, 500, 7])
    x = mid[:5]
    y = f(x, idx)
    assert torch.equal(f(x, idx), y)  # reproducible
    perm = torch.tensor([4, 2, 0, 1, 3])
    assert torch.equal(f(x[perm], idx[perm]), y[perm])  # depends on the index, not the position
    assert torch.equal(f(x[1], 10), y[1])  # single image with its index
    starts = f.band_starts(idx)
    assert len(torch.unique(starts)) == 5 and starts.min() >= 0 and (starts + 0.25).max() <= 1
    # each image loses exactly its own band [s_i, s_i + w)
    r = sp.radial_frequency(32, 32, dtype=torch.float64)
    for i in range(5):
        band = (r >= starts[i]) & (r < starts[i] + 0.25) & (r > 0)
        _assert_removes(x[i : i + 1], y[i : i + 1], band)
    # the same image under another index loses another band; another seed draws other bands
    assert not torch.allclose(f(x[:1], torch.tensor([4])), y[:1])
    assert not torch.equal(fl.RandomBandStop(0.25, seed=1).band_starts(idx), starts)
    # without indices a batch is numbered 0..N-1
    assert torch.equal(f(x), f(x, torch.arange(5)))
    with pytest.raises(ValueError, match="indices"):
        f(x, torch.arange(3))


def test_random_band_uint8_does_not_depend_on_chunking():
    g = torch.Generator().manual_seed(3)
    imgs = torch.randint(0, 256, (10, 3, 16, 16), generator=g, dtype=torch.uint8)
    f = fl.RandomBandStop(0.3)
    whole = fl.apply_filter_uint8(imgs, f)
    assert whole.dtype == torch.uint8 and whole.shape == imgs.shape
    assert torch.equal(fl.apply_filter_uint8(imgs, f, batch_size=3), whole)
    ref = (f(imgs.float() / 255, torch.arange(10)) * 255).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(whole, ref)
    # explicit dataset indices: image i of a subset keeps the band of its dataset index
    sub = torch.tensor([7, 2, 9])
    assert torch.equal(fl.apply_filter_uint8(imgs[sub], f, indices=sub), whole[sub])
    with pytest.raises(ValueError, match="indices"):
        fl.apply_filter_uint8(imgs, f, indices=torch.arange(4))


@pytest.mark.parametrize("name", CANONICAL_NAMES)
def test_uint8_conventions(name):
    f = fl.filter_from_name(name)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (4, 3, 16, 16), generator=g, dtype=torch.uint8)
    out = fl.apply_filter_uint8(imgs, f, batch_size=3)
    assert out.dtype == torch.uint8 and out.shape == imgs.shape
    ref = (f(imgs.float() / 255) * 255).round().clamp(0, 255).to(torch.uint8)
    if not getattr(f, "per_image", False):
        assert torch.equal(out, ref)
    y = f(imgs.double() / 255)
    assert y.dtype == torch.float64 and y.min() >= 0 and y.max() <= 1


def test_data_filter_name_uses_the_parser():
    from fuse_lightning.data.base import filter_name

    assert filter_name(None) == "none"
    assert filter_name("lowpass-gauss-0.50") == "lowpass-gaussian-0.5"
    assert filter_name(fl.BandStop(0.25, 0.5)) == "bandstop-ideal-0.25-0.5"
    with pytest.raises(ValueError, match="accepted forms"):
        filter_name("nosuchfilter")


def test_apply_filter_uint8_chunks():
    g = torch.Generator().manual_seed(3)
    imgs = torch.randint(0, 256, (10, 3, 8, 8), generator=g, dtype=torch.uint8)
    f = fl.LowPass(0.5)
    out = fl.apply_filter_uint8(imgs, f, batch_size=3)
    assert out.dtype == torch.uint8 and out.shape == imgs.shape
    ref = (f(imgs.float() / 255) * 255).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(out, ref)
    assert torch.equal(fl.apply_filter_uint8(imgs, fl.NoFilter()), imgs)
    # the low-pass removes high-frequency energy of the stored data
    e = sp.band_energy(imgs.float() - imgs.float().mean(), (0, 0.51, math.sqrt(2) + 1e-6))
    e_out = sp.band_energy(out.float() - out.float().mean(), (0, 0.51, math.sqrt(2) + 1e-6))
    assert e_out[1] < 0.2 * e[1]
