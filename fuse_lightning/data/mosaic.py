"""Carry a CIFAR-style dataset as a few JPEG mosaics (for machines without network access).

The python-pickle CIFAR-10 is 178 MB; a machine that cannot download it (an offline GPU node)
can be handed the same 60 000 images as two JPEG mosaics of about 20 MB. Each 32x32 image is one
tile of a large image; tiles are aligned with JPEG's 8x8 blocks (and 16x16 MCUs), so compression
never mixes two images. At quality 95 with 4:4:4 chroma the round trip costs ~40 dB PSNR, far
below the data's own JPEG artefacts; the gpu-check report states that its CIFAR-10 went through
this round trip.

Layout of a packed directory:

    <split>.jpg          the mosaic, `columns` tiles per row, tiles in dataset order
    <split>_labels.npy   int64 labels (N,)
    pack.json            tile size, columns, counts, variant and label names

`unpack_cifar` writes the standard pickle layout with `write_cifar`, so the project reads it like
any CIFAR copy (with `check_counts` true when the counts are complete).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fuse_lightning.data.cifar_format import (
    DatasetFormatError,
    label_names,
    read_cifar,
    write_cifar,
)

__all__ = ["pack_cifar", "tile_mosaic", "unpack_cifar", "untile_mosaic"]

# PIL refuses to open images above ~179 M pixels (a decompression-bomb guard); a CIFAR-10 mosaic
# is 51 M pixels, so the guard stays on.
MAX_TILES = 150_000


def tile_mosaic(images: np.ndarray, columns: int) -> np.ndarray:
    """Tile uint8 images (N, C, H, W) into one (rows*H, columns*W, C) array, row-major.

    Missing tiles at the end of the last row are black.
    """
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    padded = np.zeros((rows * columns, c, h, w), dtype=np.uint8)
    padded[:n] = images
    grid = padded.reshape(rows, columns, c, h, w).transpose(0, 3, 1, 4, 2)
    return np.ascontiguousarray(grid.reshape(rows * h, columns * w, c))


def untile_mosaic(mosaic: np.ndarray, count: int, tile: int) -> np.ndarray:
    """Inverse of `tile_mosaic`: (rows*H, columns*W, C) -> the first `count` tiles (N, C, H, W)."""
    height, width, c = mosaic.shape
    if height % tile or width % tile:
        raise DatasetFormatError(f"mosaic of {width}x{height} pixels is not a whole number of {tile}-pixel tiles")
    rows, columns = height // tile, width // tile
    if count > rows * columns:
        raise DatasetFormatError(f"mosaic holds {rows * columns} tiles, the pack says {count}")
    grid = mosaic.reshape(rows, tile, columns, tile, c).transpose(0, 2, 4, 1, 3)
    return np.ascontiguousarray(grid.reshape(rows * columns, c, tile, tile)[:count])


def pack_cifar(
    data_dir: str | Path, out_dir: str | Path, variant: str = "cifar10", quality: int = 95, columns: int = 250
) -> dict:
    """Pack a CIFAR copy (train and test) into JPEG mosaics under `out_dir`.

    Args:
        data_dir: Directory holding the CIFAR pickles (or their parent).
        out_dir: Destination directory (created).
        variant: "cifar10" or "cifar100".
        quality: JPEG quality (95 keeps the round trip near 40 dB PSNR).
        columns: Tiles per mosaic row.

    Returns:
        The pack description written to `pack.json`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"variant": variant, "tile": 32, "columns": columns, "quality": quality, "counts": {}}
    try:
        info["label_names"] = label_names(data_dir, variant)
    except DatasetFormatError:
        info["label_names"] = None
    for split in ("train", "test"):
        images, labels = read_cifar(data_dir, variant, split)
        if len(labels) > MAX_TILES:
            raise DatasetFormatError(f"{data_dir}: {len(labels)} images exceed the mosaic limit {MAX_TILES}")
        mosaic = tile_mosaic(images.numpy(), columns)
        # 4:4:4 chroma (subsampling=0): 4:2:0 would blur colour edges across the whole mosaic.
        Image.fromarray(mosaic).save(out / f"{split}.jpg", quality=quality, subsampling=0)
        np.save(out / f"{split}_labels.npy", labels.numpy().astype(np.int64))
        info["counts"][split] = len(labels)
    (out / "pack.json").write_text(json.dumps(info, indent=2))
    return info


def unpack_cifar(pack_dir: str | Path, data_dir: str | Path) -> Path:
    """Write the standard CIFAR pickle layout under `data_dir` from a packed directory.

    Returns:
        The variant directory (e.g. `<data_dir>/cifar-10-batches-py`).
    """
    pack = Path(pack_dir)
    meta_path = pack / "pack.json"
    if not meta_path.is_file():
        raise DatasetFormatError(f"{pack}: no pack.json; not a directory written by pack_cifar")
    info = json.loads(meta_path.read_text())
    written: list[Path] = []
    for split in ("train", "test"):
        count = int(info["counts"][split])
        with Image.open(pack / f"{split}.jpg") as img:
            mosaic = np.asarray(img.convert("RGB"))
        images = untile_mosaic(mosaic, count, int(info["tile"]))
        # allow_pickle=False: labels are a plain int64 array, never objects.
        labels = np.load(pack / f"{split}_labels.npy", allow_pickle=False)
        if len(labels) != count:
            raise DatasetFormatError(f"{pack}/{split}_labels.npy has {len(labels)} labels, pack.json says {count}")
        written += write_cifar(
            data_dir, torch.from_numpy(images), torch.from_numpy(labels), info["variant"], split,
            label_names=info.get("label_names"),
        )
    return written[0].parent
