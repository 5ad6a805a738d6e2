"""Plain ``nn.Module`` networks: classifiers and perturbation generators."""

from fuse_lightning.nets.classifiers import (
    CLASSIFIERS,
    FastNet,
    WideResNet,
    available_classifiers,
    build_classifier,
)
from fuse_lightning.nets.generators import (
    GENERATORS,
    EncoderDecoderGenerator,
    UNetGenerator,
    available_generators,
    build_generator,
)

__all__ = [
    "CLASSIFIERS",
    "GENERATORS",
    "EncoderDecoderGenerator",
    "FastNet",
    "UNetGenerator",
    "WideResNet",
    "available_classifiers",
    "available_generators",
    "build_classifier",
    "build_generator",
]
