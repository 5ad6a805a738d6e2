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
        fl.BandPass(0.25, 0.5),
        fl.JPEG(10),
        fl.Grayscale(),
    ],
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


def test_names():
    assert fl.NoFilter().name == "none"
    assert fl.LowPass(0.5).name == "lowpass-ideal-0.5"
    assert fl.LowPass(1.0, "gaussian").name == "lowpass-gaussian-1"
    assert fl.BandPass(0.25, 0.5).name == "bandpass-ideal-0.25-0.5"
    assert fl.JPEG(10).name == "jpeg-10"
    for name in [
        "none",
        "lowpass-ideal-0.25",
        "lowpass-gaussian-0.5",
        "jpeg-10",
        "grayscale",
        "bandpass-ideal-0.25-0.5",
        "highpass-ideal-0.5",
        "lowpass-butterworth-0.5",
        "lowpass-butterworth4-0.5",
    ]:
        assert fl.filter_from_name(name).name == name
    f = fl.filter_from_name("lowpass-butterworth4-0.5")
    assert isinstance(f, fl.LowPass) and f.order == 4 and f.cutoff == 0.5


@pytest.mark.parametrize(
    "bad", ["", "lowpass", "lowpass-box-0.5", "jpeg-x", "blur-3", "lowpass-ideal-2", "jpeg-0"]
)
def test_bad_names_raise(bad):
    with pytest.raises(ValueError):
        fl.filter_from_name(bad)


def test_bad_name_message_lists_forms():
    with pytest.raises(ValueError, match="accepted forms"):
        fl.filter_from_name("blur-3")


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
