"""`fuse protect --images`: unique reversible names, every PIL mode handled or refused, tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fuse_lightning.fuse_module import FUSEModule
from fuse_lightning.images import (
    ImageModeError,
    output_name,
    perturb_tiled,
    read_image,
    source_name,
    tile_slices,
)
from fuse_lightning.manifest import verify_manifest
from fuse_lightning.protect import protect_folder


@pytest.fixture(scope="module")
def model() -> FUSEModule:
    torch.manual_seed(0)
    net = FUSEModule(surrogate_arch="fastnet", surrogate_kwargs={"width": 0.25}, generator_width=8)
    with torch.no_grad():
        for p in net.generator.parameters():
            p.mul_(20)  # large perturbations: the budget must hold
    return net.eval()


def noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w, channels) if channels > 1 else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def test_same_stem_different_extension_are_both_kept(model, tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(noise(20, 24, seed=1)).save(folder / "a.png")
    Image.fromarray(noise(20, 24, seed=2)).save(folder / "a.bmp")
    out = protect_folder(model, folder, tmp_path / "out", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a.bmp.png", "a.png.png", "manifest.json"]
    for name in ("a.png", "a.bmp"):
        protected = np.asarray(Image.open(out / output_name(name))).astype(int)
        clean = np.asarray(Image.open(folder / source_name(f"{name}.png"))).astype(int)
        assert np.abs(protected - clean).max() <= 8
    assert verify_manifest(out)["images"]["a.bmp.png"]["source"] == "a.bmp"


def test_modes_are_handled_or_refused(model, tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    gray16 = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50)  # spans 0..59950
    Image.fromarray(gray16).save(folder / "g16.png")
    Image.fromarray(noise(30, 40, 4, seed=3)).save(folder / "rgba.png")
    Image.fromarray(noise(30, 40, seed=4)).convert("P").save(folder / "pal.png")
    Image.fromarray(noise(30, 40, 1, seed=5)).save(folder / "gray.png")
    out = protect_folder(model, folder, tmp_path / "out", progress=False)
    # 16-bit: scaled to 8 bits, not clipped to white.
    g16 = np.asarray(Image.open(out / "g16.png.png")).astype(int)
    expected = np.rint(gray16 / 257.0).astype(int)
    assert g16.shape == (30, 40, 3) and np.abs(g16 - expected[..., None]).max() <= 8
    assert g16.mean() < 200
    # Alpha is copied unchanged.
    rgba_in = np.asarray(Image.open(folder / "rgba.png"))
    rgba_out = np.asarray(Image.open(out / "rgba.png.png"))
    assert rgba_out.shape == (30, 40, 4) and np.array_equal(rgba_out[..., 3], rgba_in[..., 3])
    assert np.abs(rgba_out[..., :3].astype(int) - rgba_in[..., :3]).max() <= 8
    pal_in = np.asarray(Image.open(folder / "pal.png").convert("RGB")).astype(int)
    assert np.abs(np.asarray(Image.open(out / "pal.png.png")).astype(int) - pal_in).max() <= 8
    manifest = verify_manifest(out)
    assert manifest["images"]["rgba.png.png"]["alpha"] == "copied unchanged"
    assert manifest["images"]["g16.png.png"]["source_mode"].startswith("I")
    # CMYK is refused with a message naming the file; nothing is written.
    Image.fromarray(noise(10, 10, 4)).convert("CMYK").save(folder / "print.tiff")
    with pytest.raises(ImageModeError, match=r"print\.tiff.*CMYK"):
        protect_folder(model, folder, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))


def test_tiles_cover_every_pixel_once():
    for length, tile, overlap in [(1, 4, 2), (10, 4, 1), (12, 4, 0), (3000, 512, 32)]:
        covered = np.zeros(length, int)
        for inp, keep in tile_slices(length, tile, overlap):
            assert inp.stop - inp.start <= tile + 2 * overlap
            covered[inp.start + keep.start: inp.start + keep.stop] += 1
        assert (covered == 1).all()


def test_large_images_are_perturbed_in_bounded_tiles(model, tmp_path: Path):
    seen = []

    def spy(crop):
        seen.append(tuple(crop.shape[-2:]))
        return model.perturbation(crop, torch.tensor([0]))

    x = torch.rand(1, 3, 150, 230)
    delta = perturb_tiled(spy, x, tile=64, overlap=8)
    assert delta.shape == x.shape and max(max(s) for s in seen) <= 64 + 16
    assert len(seen) == 3 * 4 and delta.abs().max() <= 8 / 255 + 1e-6
    full = model.perturbation(x, torch.tensor([0]))
    # Away from the seams the tiled perturbation matches the whole-image one closely.
    center = (delta - full)[..., 8:56, 8:56].abs().mean() / full.abs().mean()
    assert center < 0.5
    folder = tmp_path / "big"
    folder.mkdir()
    Image.fromarray(noise(150, 230)).save(folder / "big.png")
    out = protect_folder(model, folder, tmp_path / "out", progress=False, tile=64, overlap=8)
    clean = np.asarray(Image.open(folder / "big.png")).astype(int)
    assert np.abs(np.asarray(Image.open(out / "big.png.png")).astype(int) - clean).max() <= 8


def test_read_image_refuses_float_images(tmp_path: Path):
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(ImageModeError, match="mode F"):
        read_image(tmp_path / "f.tiff")
