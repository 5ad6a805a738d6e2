"""Perturbation generators: fully convolutional image-to-image networks.

A generator maps images (N, C, H, W) to an unbounded perturbation map of the same shape; the
caller bounds it (e.g. ``eps * tanh(out)``). The networks are resolution-agnostic: the same module
serves 32x32 and 224x224 inputs, and inputs whose sides are not a multiple of the total stride are
padded internally and cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

#: Scale applied to the default init of the output conv.
OUTPUT_INIT_SCALE = 0.1


def _norm(channels: int) -> nn.GroupNorm:
    # why GroupNorm and not BatchNorm: BatchNorm couples the samples of a batch through its
    # statistics, so one image's perturbation would depend on which other images share its batch
    # and would differ between train and eval mode. Perturbations are sample-wise, so each image is
    # normalized on its own.
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _conv_norm_act(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        _norm(out_ch),
        nn.ReLU(inplace=True),
    )


def _output_conv(in_ch: int, out_ch: int, kernel: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)
    # why: small (not zero) output weights make the initial perturbation close to zero, so the
    # bounding tanh starts in its linear range instead of saturating at +-eps, while gradients still
    # reach every earlier layer (all-zero weights would block them on the first step).
    with torch.no_grad():
        conv.weight.mul_(OUTPUT_INIT_SCALE)
        conv.bias.zero_()
    return conv


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad H and W (bottom/right, replicate) up to a multiple of ``multiple``.

    Args:
        x: Tensor of shape (N, C, H, W).
        multiple: Required divisor of the padded height and width.

    Returns:
        The padded tensor and the original (H, W), for cropping back.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        # why replicate: reflect padding fails when the pad exceeds the image side.
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


class ResidualBottleneck(nn.Module):
    """Residual block 1x1 (reduce) -> 3x3 -> 1x1 (expand), each conv followed by GroupNorm.

    Args:
        channels: Input and output channels.
        reduction: Channel reduction of the inner 3x3 conv.
    """

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        mid = max(1, channels // reduction)
        self.body = nn.Sequential(
            nn.Conv2d(channels, mid, 1, bias=False),
            _norm(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            _norm(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, channels, 1, bias=False),
            _norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def _upsample_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    # why: nearest-neighbour upsampling followed by a conv avoids the checkerboard artefacts of
    # transposed convolutions, which would show up as a periodic high-frequency pattern.
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _conv_norm_act(in_ch, out_ch))


class EncoderDecoderGenerator(nn.Module):
    """Encoder / residual bottleneck / decoder generator (~0.3M parameters at base_width 32).

    Args:
        in_channels: Input channels (image plus any conditioning channels).
        out_channels: Output channels (default: `in_channels`).
        base_width: Channels after the stem; the encoder doubles them twice.
        num_res_blocks: Number of residual blocks at 1/4 resolution.
    """

    stride = 4

    def __init__(
        self, in_channels: int = 3, base_width: int = 32, num_res_blocks: int = 2, out_channels: int | None = None
    ) -> None:
        super().__init__()
        w1, w2, w3 = base_width, 2 * base_width, 4 * base_width
        self.encoder = nn.Sequential(
            _conv_norm_act(in_channels, w1),
            _conv_norm_act(w1, w2, stride=2),
            _conv_norm_act(w2, w3, stride=2),
        )
        self.bottleneck = nn.Sequential(*[ResidualBottleneck(w3) for _ in range(num_res_blocks)])
        self.decoder = nn.Sequential(_upsample_conv(w3, w2), _upsample_conv(w2, w1))
        self.out = _output_conv(w1, out_channels or in_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, self.stride)
        y = self.out(self.decoder(self.bottleneck(self.encoder(x))))
        return y[..., :h, :w]


class _DoubleConv(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(_conv_norm_act(in_ch, out_ch), _conv_norm_act(out_ch, out_ch))


class UNetGenerator(nn.Module):
    """U-Net with skip connections (~0.85M parameters at base_width 32, depth 3).

    Encoder levels have widths ``base_width * 2**i``; the bottleneck keeps the deepest width
    (as in the bilinear-upsampling U-Net variant) instead of doubling it, which halves the
    parameter count without changing the receptive field. The decoder upsamples (nearest),
    concatenates the skip and applies a double conv.

    Args:
        in_channels: Input channels (image plus any conditioning channels).
        out_channels: Output channels (default: `in_channels`).
        base_width: Channels at full resolution.
        depth: Number of 2x downsamplings.
    """

    def __init__(
        self, in_channels: int = 3, base_width: int = 32, depth: int = 3, out_channels: int | None = None
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"UNetGenerator depth must be >= 1, got {depth}")
        self.depth = depth
        widths = [base_width * 2**i for i in range(depth)]
        self.inc = _DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), _DoubleConv(widths[i - 1], widths[i]))
            for i in range(1, depth)
        )
        self.bottom = nn.Sequential(nn.MaxPool2d(2), _DoubleConv(widths[-1], widths[-1]))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        ups = []
        in_ch = widths[-1]
        for i in reversed(range(depth)):
            out_ch = widths[max(i - 1, 0)]
            ups.append(_DoubleConv(in_ch + widths[i], out_ch))
            in_ch = out_ch
        self.ups = nn.ModuleList(ups)
        self.out = _output_conv(in_ch, out_channels or in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, 2**self.depth)
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = self.bottom(skips[-1])
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            y = up(torch.cat([self.up(y), skip], dim=1))
        return self.out(y)[..., :h, :w]


def _build_encdec(in_channels: int = 3, base_width: int = 32, **kwargs: Any) -> nn.Module:
    return EncoderDecoderGenerator(in_channels=in_channels, base_width=base_width, **kwargs)


def _build_unet(in_channels: int = 3, base_width: int = 32, **kwargs: Any) -> nn.Module:
    return UNetGenerator(in_channels=in_channels, base_width=base_width, **kwargs)


GENERATORS: dict[str, Callable[..., nn.Module]] = {
    "encdec": _build_encdec,
    "unet": _build_unet,
}


# The registry's names as a type (kept equal to GENERATORS by a test).
GeneratorName = Literal["encdec", "unet"]


def available_generators() -> list[str]:
    """Names accepted by :func:`build_generator`, sorted."""
    return sorted(GENERATORS)


def build_generator(
    arch: str = "encdec", in_channels: int = 3, base_width: int = 32, **kwargs: Any
) -> nn.Module:
    """Build a perturbation generator by name.

    Args:
        arch: One of :func:`available_generators` (``encdec`` or ``unet``).
        in_channels: Input channels (image plus any conditioning channels).
        out_channels: Output channels (default: `in_channels`).
        base_width: Channel width at full resolution.
        **kwargs: Architecture options (``num_res_blocks`` for encdec, ``depth`` for unet).

    Returns:
        A module mapping (N, C, H, W) images to an unbounded (N, C, H, W) perturbation map.

    Raises:
        ValueError: If ``arch`` is unknown.
    """
    try:
        builder = GENERATORS[arch]
    except KeyError:
        raise ValueError(
            f"unknown generator {arch!r}; choose one of {', '.join(available_generators())}"
        ) from None
    return builder(in_channels=in_channels, base_width=base_width, **kwargs)
