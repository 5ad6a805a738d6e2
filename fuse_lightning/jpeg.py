"""A differentiable JPEG (baseline, 4:2:0) for training perturbations that survive compression.

Follows the JFIF/IJG pipeline an attacker's `PIL.Image.save(format="JPEG", quality=q)` runs:
RGB -> YCbCr, 2x2 chroma averaging, 8x8 block DCT, quantization by the IJG tables scaled to
`quality`, then the inverse. Rounding uses a straight-through estimator (the forward pass rounds
exactly, the backward pass is the identity), so gradients reach every DCT coefficient that the
quantizer keeps *and* those it currently zeroes: a perturbation can learn to grow a coefficient
past the quantization threshold. Pure functions on `(N, 3, H, W)` tensors in [0, 1]; the chroma
upsampling is bilinear, which is what libjpeg's "fancy" (triangle) upsampling computes at 2x
(up to its edge handling and integer rounding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# IJG standard quantization tables (JPEG spec, Annex K), row-major 8x8.
_LUMA_TABLE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)
_CHROMA_TABLE = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
)


def quality_scale(quality: torch.Tensor) -> torch.Tensor:
    """IJG's percentage scale of the base tables for a quality in [1, 100]."""
    q = quality.clamp(1, 100)
    return torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)


def quant_tables(quality: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (luma, chroma) quantization tables, each `(N, 8, 8)`, as libjpeg builds them."""
    quality = torch.as_tensor(quality, dtype=torch.float32, device=device).reshape(-1)
    scale = quality_scale(quality).view(-1, 1, 1)
    tables = []
    for base in (_LUMA_TABLE, _CHROMA_TABLE):
        t = torch.tensor(base, dtype=torch.float32, device=quality.device).view(1, 8, 8)
        tables.append(torch.floor((t * scale + 50) / 100).clamp(1, 255))
    return tables[0], tables[1]


def dct_matrix(n: int = 8, device=None, dtype=torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II matrix `D` (coefficients of a block B are `D @ B @ D.T`)."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """JFIF RGB -> YCbCr, both in 0-255 units."""
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    return torch.stack([y, cb, cr], 1)


def ycbcr_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """JFIF YCbCr -> RGB, both in 0-255 units."""
    y, cb, cr = x[:, 0], x[:, 1] - 128, x[:, 2] - 128
    r = y + 1.402 * cr
    g = y - 0.344136 * cb - 0.714136 * cr
    b = y + 1.772 * cb
    return torch.stack([r, g, b], 1)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _blocks_quantize(channel: torch.Tensor, table: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Quantize one `(N, H, W)` channel (H, W multiples of 8) in 8x8 DCT blocks, then invert."""
    n, h, w = channel.shape
    blocks = (channel - 128).reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coef = d @ blocks @ d.T
    t = table.view(n, 1, 1, 8, 8)
    coef = _round_ste(coef / t) * t
    blocks = d.T @ coef @ d
    return blocks.permute(0, 1, 3, 2, 4).reshape(n, h, w) + 128


def diff_jpeg(x: torch.Tensor, quality: float | torch.Tensor) -> torch.Tensor:
    """JPEG-compress and decompress a batch, differentiably (straight-through rounding).

    Args:
        x: `(N, 3, H, W)` RGB in [0, 1]; any H, W (edges are replicated to a multiple of 16, as
            an encoder pads its last MCU, and cropped back).
        quality: IJG quality in [1, 100], a number or one per sample (`(N,)` tensor).

    Returns:
        The decoded batch, same shape, in [0, 1].
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"diff_jpeg needs an (N, 3, H, W) batch, got {tuple(x.shape)}")
    n, _, h, w = x.shape
    quality = torch.as_tensor(quality, dtype=torch.float32, device=x.device).reshape(-1).expand(n)
    luma_t, chroma_t = quant_tables(quality, device=x.device)
    ph, pw = (-h) % 16, (-w) % 16
    img = F.pad(x.float(), (0, pw, 0, ph), mode="replicate") * 255
    ycc = rgb_to_ycbcr(img)
    d = dct_matrix(device=x.device)
    y = _blocks_quantize(ycc[:, 0], luma_t, d)
    chroma = F.avg_pool2d(ycc[:, 1:], 2)
    cb = _blocks_quantize(chroma[:, 0], chroma_t, d)
    cr = _blocks_quantize(chroma[:, 1], chroma_t, d)
    chroma = F.interpolate(torch.stack([cb, cr], 1), scale_factor=2, mode="bilinear", align_corners=False)
    rgb = ycbcr_to_rgb(torch.cat([y.unsqueeze(1), chroma], 1)) / 255
    return rgb[:, :, :h, :w].clamp(0, 1).to(x.dtype)
