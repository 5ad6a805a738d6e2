"""Pure colour and JPEG functions: the grey share of delta, and the differentiable JPEG."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fuse_lightning.colour import gray3, luma, luma_chroma_delta
from fuse_lightning.jpeg import diff_jpeg, quant_tables


def natural_like(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images with a few edges (JPEG behaves on them as on photos, unlike noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False)
    step = (torch.arange(size) > size // 2).float().view(1, 1, 1, -1)
    img = img + 0.3 * step * torch.rand(n, 3, 1, 1, generator=g)
    return (img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1)


def pil_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for im in (x * 255).round().byte().permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        out.append(np.array(Image.open(buf).convert("RGB")))
    return torch.tensor(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0])
def test_luma_chroma_delta_stays_in_budget(share):
    raw = 10 * torch.randn(8, 3, 16, 16)
    eps = 8 / 255
    delta = luma_chroma_delta(raw, eps, share)
    assert delta.abs().max() <= eps + 1e-7
    assert delta.abs().max() > 0.9 * eps  # large logits saturate: the budget is usable


def test_grey_delta_survives_grayscale_exactly():
    x = torch.rand(4, 3, 8, 8)
    delta = luma_chroma_delta(torch.randn(4, 3, 8, 8), 8 / 255, 1.0)
    assert torch.allclose(delta[:, 0], delta[:, 1]) and torch.allclose(delta[:, 1], delta[:, 2])
    assert torch.allclose(gray3(x + delta) - gray3(x), delta, atol=1e-6)
    free = luma_chroma_delta(torch.randn(4, 3, 8, 8), 8 / 255, 0.0)
    # free RGB: grayscale keeps only part of it
    assert (luma(free).abs().mean() < 0.8 * free.abs().mean())


def test_luma_share_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="luma_share"):
        luma_chroma_delta(torch.zeros(1, 3, 4, 4), 0.03, 1.5)


def test_quant_tables_follow_ijg_scaling():
    luma_50, chroma_50 = quant_tables(torch.tensor([50.0]))
    assert luma_50[0, 0, 0] == 16 and chroma_50[0, 0, 0] == 17  # quality 50 = the base tables
    luma_10, _ = quant_tables(torch.tensor([10.0]))
    assert luma_10[0, 0, 0] == 80  # scale 500 %


@pytest.mark.parametrize("quality", [10, 50, 90])
def test_diff_jpeg_matches_pil(quality):
    x = natural_like()
    ours, reference = diff_jpeg(x, quality), pil_jpeg(x, quality)
    # Close to the real codec (integer rounding inside libjpeg is the main difference) ...
    assert psnr(ours, reference) > 35
    # ... and it loses what the codec loses: its error against the input is the codec's.
    assert abs(psnr(ours, x) - psnr(reference, x)) < 0.5


def test_diff_jpeg_passes_gradients_and_handles_odd_sizes():
    x = natural_like(2, size=28).requires_grad_(True)
    out = diff_jpeg(x, torch.tensor([10.0, 40.0]))
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_fuse_module_grey_delta_and_jpeg_in_the_masking_family():
    """luma_share 1 gives grey deltas; RSM on the image with JPEG yields a finite loss whose
    gradient reaches the generator."""
    from fuse_lightning.fuse_module import FUSEModule, RSMConfig

    torch.manual_seed(0)
    model = FUSEModule(surrogate_arch="fastnet", surrogate_kwargs={"width": 0.25}, generator_width=8,
                       luma_share=1.0, rsm=RSMConfig(apply_to="image", jpeg_prob=1.0))
    x, y = natural_like(4), torch.arange(4)
    delta = model.perturbation(x, y)
    assert torch.allclose(delta[:, 0], delta[:, 2]) and delta.abs().max() <= 8 / 255 + 1e-7
    masked = model.masked_input(x, delta)
    assert masked.shape == x.shape and not torch.allclose(masked, x + delta)
    model.surrogate.eval().requires_grad_(False)
    terms = model.generator_losses(x, y)
    assert torch.isfinite(terms["loss_generator"])
    terms["loss_generator"].backward()
    grads = [p.grad for p in model.generator.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_worst_of_picks_the_band_whose_removal_hurts_the_surrogate_most(monkeypatch):
    """With worst_of k, the RSM band of each sample is the candidate with the highest loss."""
    from fuse_lightning import spectral
    from fuse_lightning.fuse_module import FUSEModule, RSMConfig

    torch.manual_seed(0)
    edges = [0.0, 0.25, 0.5, 0.75, 1.5]
    model = FUSEModule(surrogate_arch="fastnet", surrogate_kwargs={"width": 0.25}, generator_width=8,
                       rsm=RSMConfig(band_edges=edges, worst_of=4))
    x, y = natural_like(6), torch.arange(6)
    # a linear surrogate whose loss clearly depends on which band of a strong delta is removed
    model.surrogate = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 10)).eval()
    torch.nn.init.normal_(model.surrogate[1].weight, std=1.0)
    model.surrogate.requires_grad_(False)
    delta = (8 / 255) * torch.randn_like(x).sign()
    start, width = model.worst_bands(x, delta, y)
    import torch.nn.functional as F

    def loss_without(lo, hi):
        s, w = torch.full((6,), lo), torch.full((6,), hi - lo)
        return F.cross_entropy(model.surrogate((x + spectral.remove_band(delta, s, w)).clamp(0, 1)), y,
                               reduction="none")

    all_losses = torch.stack([loss_without(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)])
    picked = torch.stack([loss_without(float(s), float(s + w))[i] for i, (s, w) in enumerate(zip(start, width, strict=True))])
    assert set(start.tolist()) <= set(edges[:-1])
    assert (all_losses.max(0).values - all_losses.min(0).values).min() > 0.01  # the bands do differ
    # each pick is at least as bad as a random band would be on average, never above the true worst
    assert torch.all(picked <= all_losses.max(0).values + 1e-5)
    assert float(picked.mean()) > float(all_losses.mean())
    # with many candidates every sample gets the true worst band
    model.rsm.worst_of = 40
    start, width = model.worst_bands(x, delta, y)
    best = torch.tensor(edges[:-1])[all_losses.argmax(0)]
    assert torch.equal(start, best)
    model.rsm.luminance_prob = 0.0  # else some masked deltas are also reduced to their luma
    masked_loss = F.cross_entropy(model.surrogate(model.masked_input(x, delta, y).clamp(0, 1)), y, reduction="none")
    assert torch.allclose(masked_loss, all_losses.max(0).values, rtol=1e-4)  # the RSM input removes the worst band
    with pytest.raises(ValueError, match="worst_of"):
        FUSEModule(surrogate_arch="fastnet", rsm=RSMConfig(worst_of=0))
    with pytest.raises(ValueError, match="band edges"):
        FUSEModule(surrogate_arch="fastnet", rsm=RSMConfig(band_edges=[0.5, 0.25]))


def test_grayscale_player_term_and_surrogate_share():
    """gray_weight adds CE(f(gray(x + delta)), y) to the generator loss; gray_surrogate_share
    turns that share of the surrogate's batch grey and leaves the rest as x + delta."""
    import torch.nn.functional as F

    from fuse_lightning.colour import gray3
    from fuse_lightning.fuse_module import CBGConfig, FUSEModule, RSMConfig

    torch.manual_seed(0)
    kw = dict(surrogate_arch="fastnet", surrogate_kwargs={"width": 0.25}, generator_width=8,
              rsm=RSMConfig(enabled=False), cbg=CBGConfig(enabled=False))
    model = FUSEModule(gray_weight=2.0, gray_surrogate_share=0.25, **kw)
    x, y = natural_like(8), torch.arange(8) % 10
    model.surrogate.eval().requires_grad_(False)
    terms = model.generator_losses(x, y)
    delta = model.perturbation(x, y)
    expected_gray = F.cross_entropy(model.surrogate(gray3((x + delta).clamp(0, 1))), y)
    assert float(terms["loss_gray"]) == pytest.approx(float(expected_gray), rel=1e-5)
    assert float(terms["loss_generator"]) == pytest.approx(float(terms["loss_em"] + 2.0 * expected_gray), rel=1e-5)
    terms["loss_generator"].backward()
    assert sum(float(p.grad.abs().sum()) for p in model.generator.parameters() if p.grad is not None) > 0
    # without the option there is no grey term
    assert "loss_gray" not in FUSEModule(**kw).generator_losses(x, y)

    seen = model.surrogate_inputs(x, y)
    protected = (x + delta.detach()).clamp(0, 1)
    assert torch.allclose(seen[:6], protected[:6])  # 8 * 0.25 = 2 grey images at the end
    assert torch.allclose(seen[6:], gray3(protected[6:]))
    assert not torch.allclose(seen[6:], protected[6:])
    for bad in ({"gray_weight": -1.0}, {"gray_surrogate_share": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FUSEModule(**bad, **kw)


def test_rsm_term_is_split_into_its_luminance_and_colour_samples():
    """loss_rsm_luma / loss_rsm_colour are the RSM term's mean over the samples reduced to
    luminance and over the others; weighted by their counts they give back loss_rsm."""
    from fuse_lightning.fuse_module import FUSEModule, RSMConfig

    torch.manual_seed(0)
    model = FUSEModule(surrogate_arch="fastnet", surrogate_kwargs={"width": 0.25}, generator_width=8,
                       rsm=RSMConfig(luminance_prob=0.5))
    x, y = natural_like(16), torch.arange(16) % 10
    # a surrogate that reads colour (random linear weights per channel), unlike a fresh fastnet
    model.surrogate = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 10)).eval()
    torch.nn.init.normal_(model.surrogate[1].weight, std=1.0)
    model.surrogate.requires_grad_(False)
    chosen = torch.tensor([True, False] * 8)
    model.sample_luma_choice = lambda n, device: chosen  # fix which samples go grey
    terms = model.generator_losses(x, y)
    n_luma = int(chosen.sum())
    mixed = (n_luma * terms["loss_rsm_luma"] + (16 - n_luma) * terms["loss_rsm_colour"]) / 16
    assert float(mixed) == pytest.approx(float(terms["loss_rsm"]), rel=1e-5)
    assert abs(float(terms["loss_rsm_luma"]) - float(terms["loss_rsm_colour"])) > 0.1
    # the luma samples really were grey: their masked delta is equal in every channel
    delta = model.perturbation(x, y)
    torch.manual_seed(1)
    masked = model.masked_input(x, delta, y, chosen) - x
    assert torch.allclose(masked[chosen][:, 0], masked[chosen][:, 1], atol=1e-6)
    assert not torch.allclose(masked[~chosen][:, 0], masked[~chosen][:, 1], atol=1e-6)
    # without colour masking there is nothing to split
    model = FUSEModule(surrogate_arch="fastnet", surrogate_kwargs={"width": 0.25}, generator_width=8,
                       rsm=RSMConfig(luminance_prob=0.0))
    model.surrogate.eval().requires_grad_(False)
    assert "loss_rsm_luma" not in model.generator_losses(x, y)
