"""Reading a user's own images for `fuse protect --images`: modes, names and bounded memory.

Rules (documented in README, "Protecting your own images"):

- Output names keep the source name and add `.png` (`a.jpg` -> `a.jpg.png`), so two sources with
  the same stem never collide and `source_name` recovers the input from the output.
- Modes: 1-bit, grayscale (`L`), palette (`P`) and `RGB` are protected as RGB. Images with alpha
  (`RGBA`, `LA`, `PA`, palette with transparency) have their colour perturbed and their alpha
  channel copied unchanged into an RGBA PNG. 16-bit grayscale (`I;16*`, `I` with values in
  0..65535) is scaled to 8 bits by round(v / 257). Other modes (CMYK, YCbCr, LAB, HSV, float)
  are refused with a message naming the file: convert them to RGB with a colour-managed tool first.
- Large images are perturbed in tiles of `tile` x `tile` pixels, each run with an `overlap` margin
  of context whose output is discarded, so memory is bounded by the tile size, not the image size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np
import torch

__all__ = ["ImageModeError", "output_name", "perturb_tiled", "read_image", "source_name", "tile_slices"]

RGB_MODES = frozenset({"1", "L", "P", "RGB"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageModeError(ValueError):
    """An input image has a pixel format `--images` does not handle."""


def output_name(rel: str | PurePosixPath) -> PurePosixPath:
    """Output path of a source image: its full name plus `.png` (`cats/a.jpg` -> `cats/a.jpg.png`)."""
    rel = PurePosixPath(rel)
    return rel.with_name(rel.name + ".png")


def source_name(out_rel: str | PurePosixPath) -> PurePosixPath:
    """Inverse of `output_name`."""
    out_rel = PurePosixPath(out_rel)
    if not out_rel.name.endswith(".png") or out_rel.name == ".png":
        raise ValueError(f"{out_rel} is not an output name of fuse protect --images")
    return out_rel.with_name(out_rel.name[: -len(".png")])


def _sixteen_to_eight(array: np.ndarray, path: Path) -> np.ndarray:
    """Scale 16-bit samples to 8 bits (round(v / 257)); refuse values outside 0..65535."""
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ImageModeError(f"{path}: 32-bit integer samples outside 0..65535; save it as 8- or 16-bit first")
    return np.rint(array.astype(np.float64) / 257.0).astype(np.uint8)


def read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Decode an image into 8-bit RGB plus its alpha channel, following the module's rules.

    Args:
        path: Image file.

    Returns:
        (rgb uint8 (H, W, 3), alpha uint8 (H, W) or None, the source PIL mode).

    Raises:
        ImageModeError: An unsupported mode (the message names the file and the fix).
        ValueError: The file cannot be decoded.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            has_transparency = mode == "P" and "transparency" in img.info
            if mode in SIXTEEN_BIT_MODES:
                gray = _sixteen_to_eight(np.asarray(img), path)
                return np.repeat(gray[..., None], 3, axis=2), None, mode
            if mode in ALPHA_MODES or has_transparency:
                rgba = np.asarray(img.convert("RGBA"))
                return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3]), mode
            if mode in RGB_MODES:
                return np.array(img.convert("RGB")), None, mode
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    raise ImageModeError(
        f"{path}: image mode {mode} is not supported (RGB, grayscale, palette, 16-bit grayscale and "
        f"their alpha variants are); convert it to RGB or RGBA first"
    )


def tile_slices(length: int, tile: int, overlap: int) -> list[tuple[slice, slice]]:
    """Split one axis into tiles: (input slice with context, output slice within that input).

    Args:
        length: Axis length in pixels.
        tile: Tile size (output pixels per tile).
        overlap: Context pixels added on each side of a tile and discarded afterwards.

    Returns:
        For each tile, the slice of the image to feed and the slice of the result to keep,
        relative to the fed crop. The kept parts cover `0..length` exactly once.
    """
    if tile <= 0 or overlap < 0:
        raise ValueError(f"tile must be > 0 and overlap >= 0, got {tile}, {overlap}")
    pieces = []
    for start in range(0, length, tile):
        stop = min(start + tile, length)
        lo, hi = max(0, start - overlap), min(length, stop + overlap)
        pieces.append((slice(lo, hi), slice(start - lo, stop - lo)))
    return pieces


@torch.no_grad()
def perturb_tiled(
    perturb: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int = 512, overlap: int = 32
) -> torch.Tensor:
    """Apply a fully convolutional perturbation tile by tile, with bounded memory.

    Args:
        perturb: `x_crop (1, C, h, w) -> delta_crop` of the same shape.
        x: Image (1, C, H, W) in [0, 1].
        tile: Output tile size; images with both sides <= tile are done in one call.
        overlap: Context margin on each side of a tile (its output is discarded).

    Returns:
        delta (1, C, H, W) on `x`'s device.
    """
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return perturb(x)
    delta = torch.empty_like(x)
    for rows_in, rows_keep in tile_slices(height, tile, overlap):
        for cols_in, cols_keep in tile_slices(width, tile, overlap):
            crop = perturb(x[..., rows_in, cols_in])
            out_rows = slice(rows_in.start + rows_keep.start, rows_in.start + rows_keep.stop)
            out_cols = slice(cols_in.start + cols_keep.start, cols_in.start + cols_keep.stop)
            delta[..., out_rows, out_cols] = crop[..., rows_keep, cols_keep]
    return delta
