"""Label-conditioned perturbation generator: delta = G(x, y).

The data owner knows each image's label, and an error-minimizing perturbation must correlate with
it (that is the shortcut). Feeding the label to the generator lets it produce a class-consistent
shortcut from the first step instead of having to infer the class from the image content.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuse_lightning.nets.generators import GeneratorName, build_generator


class ConditionedGenerator(nn.Module):
    """A fully convolutional generator fed with the image and per-class embedding channels.

    Args:
        arch: Backbone name (`encdec` or `unet`).
        num_classes: Number of classes (size of the label embedding table).
        in_channels: Image channels.
        base_width: Backbone width.
        embed_dim: Label-embedding channels; 0 disables conditioning (delta = G(x)).
        code_size: 0 broadcasts each class's embedding as constant channels; k > 0 learns a
            k x k spatial code per class, bilinearly resized to the image (resolution-agnostic),
            which hands the generator a class-specific spatial layout to build on.
        output_code_size: 0 disables; k > 0 adds a learned k x k code per class (one per image
            channel, initialised N(0, 1), bilinearly resized to the image) to the backbone's
            output: the perturbation starts as class-wise random noise, the strongest known
            shortcut, and the backbone shapes it per image from there.
        output_code_trainable: False keeps the output codes at their random draw (a buffer, saved
            with the model), to test whether learning the codes is what merges a grey delta's
            classes into 2-3 patterns. Measured: it is not (the backbone's output merges them
            too, and fixed codes protect no better; docs/method.md, "A grey class code").
    """

    def __init__(
        self,
        arch: GeneratorName = "encdec",
        num_classes: int = 10,
        in_channels: int = 3,
        base_width: int = 32,
        embed_dim: int = 8,
        code_size: int = 0,
        output_code_size: int = 0,
        output_code_trainable: bool = True,
    ) -> None:
        super().__init__()
        if output_code_size < 0:
            raise ValueError(f"output_code_size must be >= 0, got {output_code_size}")
        self.embed_dim = embed_dim
        self.code_size = code_size
        self.embedding = nn.Embedding(num_classes, embed_dim) if embed_dim > 0 and code_size == 0 else None
        self.codes = (
            nn.Parameter(torch.randn(num_classes, embed_dim, code_size, code_size))
            if embed_dim > 0 and code_size > 0
            else None
        )
        codes = torch.randn(num_classes, in_channels, output_code_size, output_code_size) if output_code_size else None
        if codes is not None and output_code_trainable:
            self.output_codes = nn.Parameter(codes)
        else:
            self.register_buffer("output_codes", codes)  # None registers nothing in the state dict
        self.backbone = build_generator(
            arch,
            in_channels=in_channels + embed_dim,
            out_channels=in_channels,
            base_width=base_width,
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Raw (unbounded) perturbation logits of the same shape as `x`."""
        if (self.embed_dim > 0 or self.output_codes is not None) and y is None:
            raise ValueError("this generator is label-conditioned: pass labels y")
        out_code = None
        if self.output_codes is not None:
            out_code = F.interpolate(self.output_codes[y], size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.embed_dim > 0:
            if self.codes is not None:
                maps = F.interpolate(self.codes[y], size=x.shape[-2:], mode="bilinear", align_corners=False)
            else:
                maps = self.embedding(y)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
            x = torch.cat([x, maps.to(x.dtype)], dim=1)
        out = self.backbone(x)
        return out if out_code is None else out + out_code.to(out.dtype)
