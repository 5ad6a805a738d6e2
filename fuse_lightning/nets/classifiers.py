"""Image classifiers (victim and surrogate models) behind a small name registry.

Every model takes NORMALIZED float images of shape (N, C, H, W) and returns logits of shape
(N, num_classes). Models built for ``image_size <= 64`` use the usual CIFAR-style small stems
(no aggressive early downsampling); larger images get the ImageNet stems. Heads always sit behind
adaptive pooling, so a model also runs on resolutions other than the one it was built for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

#: Largest image side that still gets the small (CIFAR-style) stem.
SMALL_IMAGE_MAX = 64


def _is_small(image_size: int) -> bool:
    return image_size <= SMALL_IMAGE_MAX


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """Conv2d with 'same'-style padding and Kaiming init (as torchvision's ResNets use)."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


# --------------------------------------------------------------------------------------------
# torchvision-based models
# --------------------------------------------------------------------------------------------


def _resnet(
    factory: Callable[..., models.ResNet],
    num_classes: int,
    image_size: int,
    in_channels: int,
    **kwargs: Any,
) -> nn.Module:
    model = factory(num_classes=num_classes, weights=None, **kwargs)
    if _is_small(image_size):
        # why: a 7x7/2 conv + max-pool shrinks 32x32 to 8x8 before the first block and costs
        # several points of accuracy on CIFAR; the standard CIFAR ResNet keeps full resolution.
        model.conv1 = _conv(in_channels, 64, 3, stride=1)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def _narrow_resnet18(num_classes: int, in_channels: int, width: int) -> nn.Module:
    """ResNet-18 with stage widths width, 2, 4 and 8 x width and the CIFAR stem (torchvision blocks)."""
    from torchvision.models.resnet import BasicBlock, conv1x1

    layers: list[nn.Module] = [_conv(in_channels, width, 3), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    planes_in = width
    for stage, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            down = None
            if stride != 1 or planes_in != planes:
                down = nn.Sequential(conv1x1(planes_in, planes, stride), nn.BatchNorm2d(planes))
            layers.append(BasicBlock(planes_in, planes, stride, down))
            planes_in = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(planes_in, num_classes)]
    return nn.Sequential(*layers)


def build_resnet18(
    num_classes: int, image_size: int = 32, in_channels: int = 3, width: int = 64, **kwargs: Any
) -> nn.Module:
    """ResNet-18 (torchvision) with a CIFAR stem for small images.

    Args:
        num_classes: Number of output logits.
        image_size: Input side length; <= 64 selects the 3x3 stride-1 stem without max-pool.
        in_channels: Number of input channels.
        width: Channels of the first stage (64 is the standard net; the stages double it). A
            narrower net (e.g. 16: 1/16 of the FLOPs) is for CPU budgets; small images only.
        **kwargs: Passed to ``torchvision.models.resnet18`` (width 64 only).
    """
    if width != 64:
        if not _is_small(image_size) or kwargs:
            raise ValueError("resnet18: a width other than 64 is for small images, without other options")
        return _narrow_resnet18(num_classes, in_channels, width)
    return _resnet(models.resnet18, num_classes, image_size, in_channels, **kwargs)


def build_resnet50(
    num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """ResNet-50 (torchvision) with a CIFAR stem for small images.

    Args:
        num_classes: Number of output logits.
        image_size: Input side length; <= 64 selects the 3x3 stride-1 stem without max-pool.
        in_channels: Number of input channels.
        **kwargs: Passed to ``torchvision.models.resnet50``.
    """
    return _resnet(models.resnet50, num_classes, image_size, in_channels, **kwargs)


class _GapVGG(nn.Module):
    """VGG features followed by global average pooling and a single linear layer."""

    def __init__(self, features: nn.Module, num_classes: int, channels: int = 512) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build_vgg16_bn(
    num_classes: int, image_size: int = 32, in_channels: int = 3, width: float = 1.0, **kwargs: Any
) -> nn.Module:
    """VGG-16 with batch norm; small images use a GAP + Linear head.

    Args:
        num_classes: Number of output logits.
        image_size: Input side length; <= 64 replaces the 7x7x512 -> 4096 -> 4096 classifier
            (~120M parameters) by global average pooling and one linear layer.
        in_channels: Number of input channels.
        width: Channel multiplier of every conv layer (small images only; 0.25 gives 16..128
            channels and ~1/16 of the FLOPs, for CPU budgets).
        **kwargs: Passed to ``torchvision.models.vgg16_bn`` (large images only).
    """
    if not _is_small(image_size):
        if width != 1.0:
            raise ValueError("vgg16_bn: width applies to small images only")
        model = models.vgg16_bn(num_classes=num_classes, weights=None, **kwargs)
    else:
        # why: build the features directly so the 100M-parameter classifier is never allocated.
        cfg = [v if v == "M" else max(1, round(v * width)) for v in models.vgg.cfgs["D"]]
        model = _GapVGG(models.vgg.make_layers(cfg, batch_norm=True), num_classes, channels=cfg[-2])
        for m in model.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
    if in_channels != 3:
        model.features[0] = _conv(in_channels, model.features[0].out_channels, 3, bias=True)
    return model


def build_densenet121(
    num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """DenseNet-121 (torchvision) with a 3x3 stride-1 stem and no pool0 for small images.

    Args:
        num_classes: Number of output logits.
        image_size: Input side length; <= 64 selects the small stem.
        in_channels: Number of input channels.
        **kwargs: Passed to ``torchvision.models.densenet121``.
    """
    model = models.densenet121(num_classes=num_classes, weights=None, **kwargs)
    if _is_small(image_size):
        model.features.conv0 = _conv(in_channels, 64, 3, stride=1)
        model.features.pool0 = nn.Identity()
    elif in_channels != 3:
        model.features.conv0 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.features.conv0.weight)
    return model


def build_mobilenet_v2(
    num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """MobileNetV2 (torchvision); small images drop the first two stride-2 steps.

    Args:
        num_classes: Number of output logits.
        image_size: Input side length; <= 64 uses stride 1 in the first conv and in the first
            24-channel block (the common CIFAR variant: total stride 8 instead of 32).
        in_channels: Number of input channels.
        **kwargs: Passed to ``torchvision.models.mobilenet_v2``.
    """
    model = models.mobilenet_v2(num_classes=num_classes, weights=None, **kwargs)
    stem = model.features[0][0]
    if in_channels != 3 or _is_small(image_size):
        stride = 1 if _is_small(image_size) else 2
        model.features[0][0] = nn.Conv2d(
            in_channels, stem.out_channels, 3, stride=stride, padding=1, bias=False
        )
        nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    if _is_small(image_size):
        block = model.features[2]  # first InvertedResidual with stride 2 (16 -> 24 channels)
        block.conv[1][0].stride = (1, 1)  # its depthwise conv carries the stride
        block.stride = 1  # informational only: 16 != 24 channels, so no residual either way
    return model


def build_vit_small(
    num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """Small Vision Transformer (torchvision ``VisionTransformer``).

    Args:
        num_classes: Number of output logits.
        image_size: Input side length (fixed: ViT position embeddings are size specific).
            Patch size is 4 for image_size <= 64, else 16.
        in_channels: Number of input channels.
        **kwargs: Override ``patch_size``, ``num_layers`` (6), ``num_heads`` (8),
            ``hidden_dim`` (384), ``mlp_dim`` (768), ``dropout`` or ``attention_dropout``.
    """
    cfg: dict[str, Any] = {
        "patch_size": 4 if _is_small(image_size) else 16,
        "num_layers": 6,
        "num_heads": 8,
        "hidden_dim": 384,
        "mlp_dim": 768,
    }
    cfg.update(kwargs)
    if image_size % cfg["patch_size"] != 0:
        raise ValueError(
            f"vit_small: image_size={image_size} is not divisible by patch_size={cfg['patch_size']}"
        )
    model = models.VisionTransformer(image_size=image_size, num_classes=num_classes, **cfg)
    if in_channels != 3:
        p, d = cfg["patch_size"], cfg["hidden_dim"]
        model.conv_proj = nn.Conv2d(in_channels, d, kernel_size=p, stride=p)
        # same init as torchvision's patch embedding
        nn.init.trunc_normal_(model.conv_proj.weight, std=(1.0 / (in_channels * p * p)) ** 0.5)
        nn.init.zeros_(model.conv_proj.bias)
    return model


# --------------------------------------------------------------------------------------------
# Wide-ResNet (Zagoruyko & Komodakis, 2016)
# --------------------------------------------------------------------------------------------


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 + shortcut.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        stride: Stride of the first convolution.
        dropout: Dropout probability between the two convolutions.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = _conv(in_ch, out_ch, 3, stride=stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv(out_ch, out_ch, 3)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = _conv(in_ch, out_ch, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(F.relu(self.bn2(y))))
        # why: as in the reference implementation, a projection shortcut reads the
        # pre-activated input, so the whole block sees normalized features.
        skip = x if self.shortcut is None else self.shortcut(o)
        return y + skip


class WideResNet(nn.Module):
    """Wide-ResNet WRN-depth-widen with pre-activation basic blocks.

    Args:
        depth: Total depth; (depth - 4) must be divisible by 6.
        widen: Width multiplier k (group widths 16k, 32k, 64k).
        num_classes: Number of output logits.
        image_size: Input side length; > 64 adds a 7x7 stride-2 stem conv and a max-pool
            (ImageNet-style) so that 224x224 inputs stay affordable.
        in_channels: Number of input channels.
        dropout: Dropout probability inside each block.
    """

    def __init__(
        self,
        depth: int = 16,
        widen: int = 4,
        num_classes: int = 10,
        image_size: int = 32,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        if _is_small(image_size):
            self.stem: nn.Module = _conv(in_channels, widths[0], 3)
        else:
            self.stem = nn.Sequential(
                _conv(in_channels, widths[0], 7, stride=2),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        blocks: list[nn.Module] = []
        in_ch = widths[0]
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                blocks.append(
                    PreActBasicBlock(in_ch, widths[g + 1], stride if i == 0 else 1, dropout)
                )
                in_ch = widths[g + 1]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_ch)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = self.pool(F.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


def build_wrn16_4(
    num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """WRN-16-4 (2.7M parameters).

    Args:
        num_classes: Number of output logits.
        image_size: Input side length (selects the stem).
        in_channels: Number of input channels.
        **kwargs: Passed to :class:`WideResNet` (e.g. ``dropout``).
    """
    return WideResNet(16, 4, num_classes, image_size, in_channels, **kwargs)


def build_wrn28_10(
    num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """WRN-28-10 (36.5M parameters).

    Args:
        num_classes: Number of output logits.
        image_size: Input side length (selects the stem).
        in_channels: Number of input channels.
        **kwargs: Passed to :class:`WideResNet` (e.g. ``dropout``).
    """
    return WideResNet(28, 10, num_classes, image_size, in_channels, **kwargs)


# --------------------------------------------------------------------------------------------
# FastNet: a small airbench-style CNN for quick CPU runs
# --------------------------------------------------------------------------------------------


class FastNet(nn.Module):
    """Small, fast CNN in the style of airbench (Keller Jordan's CIFAR-10 speedruns).

    Stem conv, then blocks of ``conv -> maxpool2 -> BN -> GELU -> conv -> BN -> GELU``,
    global max-pool and a bias-free linear head multiplied by a fixed ``scale``.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        widths: Channel widths of the blocks before applying ``width``.
        width: Multiplier applied to all channel widths (e.g. 0.25 for tests).
        scale: Fixed multiplier on the logits.
        bn_momentum: BatchNorm running-stat momentum (weight of the newest batch).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, ...] = (64, 128, 256),
        width: float = 1.0,
        scale: float = 1.0 / 9.0,
        bn_momentum: float = 0.6,
    ) -> None:
        super().__init__()
        # why a high BN momentum (airbench uses 0.6): in short runs the weights change fast, and
        # slow running statistics (PyTorch default 0.1) lag behind them, so eval-mode accuracy
        # collapses although train-mode accuracy is fine.
        bn = functools.partial(nn.BatchNorm2d, momentum=bn_momentum)
        chans = [max(8, round(w * width)) for w in widths]
        stem_ch = max(8, round(32 * width))
        # why: one cheap full-resolution conv before the first pool, like airbench's 2x2
        # whitening stem, so the first block already sees edge/colour features.
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, stem_ch, 3, padding=1, bias=False),
            bn(stem_ch),
            nn.GELU(),
        ]
        in_ch = stem_ch
        for c in chans:
            layers += [
                nn.Conv2d(in_ch, c, 3, padding=1, bias=False),  # bias is redundant before BN
                # why: pooling right after the first conv halves the cost of everything after it
                nn.MaxPool2d(2),
                bn(c),
                nn.GELU(),  # smooth activation trains faster than ReLU in short schedules
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                bn(c),
                nn.GELU(),
            ]
            in_ch = c
        self.features = nn.Sequential(*layers)
        # why: global max-pool (airbench) keeps the strongest local evidence and works at any
        # resolution; adaptive so 32x32 and 64x64 share the same head.
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(in_ch, num_classes, bias=False)
        # why: max-pooled GELU features are large and un-normalized; a fixed 1/9 temperature keeps
        # the initial logits small so softmax is not saturated and early steps are stable.
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.head(x) * self.scale


def build_fastnet(
    num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """FastNet, a small airbench-like CNN for CPU runs.

    Args:
        num_classes: Number of output logits.
        image_size: Unused (the net is resolution-agnostic); kept for a uniform signature.
        in_channels: Number of input channels.
        **kwargs: Passed to :class:`FastNet` (``width``, ``widths``, ``scale``, ``bn_momentum``).
    """
    del image_size
    return FastNet(num_classes=num_classes, in_channels=in_channels, **kwargs)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": build_resnet18,
    "resnet50": build_resnet50,
    "vgg16_bn": build_vgg16_bn,
    "densenet121": build_densenet121,
    "mobilenet_v2": build_mobilenet_v2,
    "wrn16_4": build_wrn16_4,
    "wrn28_10": build_wrn28_10,
    "vit_small": build_vit_small,
    "fastnet": build_fastnet,
}


# The registry's names as a type: constructors that take an architecture name list them in
# `--help` and the config parser refuses any other name (kept equal to CLASSIFIERS by a test).
ClassifierName = Literal[
    "densenet121", "fastnet", "mobilenet_v2", "resnet18", "resnet50", "vgg16_bn", "vit_small", "wrn16_4", "wrn28_10"
]


def available_classifiers() -> list[str]:
    """Names accepted by :func:`build_classifier`, sorted."""
    return sorted(CLASSIFIERS)


def build_classifier(
    arch: str,
    num_classes: int,
    image_size: int = 32,
    in_channels: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """Build a classifier by name.

    Args:
        arch: One of :func:`available_classifiers`.
        num_classes: Number of output logits.
        image_size: Input side length; <= 64 selects CIFAR-style small stems.
        in_channels: Number of input channels.
        **kwargs: Architecture-specific options (e.g. ``width`` for ``fastnet``).

    Returns:
        A module mapping normalized images (N, C, H, W) to logits (N, num_classes).

    Raises:
        ValueError: If ``arch`` is unknown.
    """
    try:
        builder = CLASSIFIERS[arch]
    except KeyError:
        raise ValueError(
            f"unknown classifier {arch!r}; choose one of {', '.join(available_classifiers())}"
        ) from None
    return builder(num_classes, image_size=image_size, in_channels=in_channels, **kwargs)
