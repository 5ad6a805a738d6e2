"""Plain ``nn.Module`` networks (classifiers, perturbation generators) and their training helpers."""

from fuse_lightning.nets.classifiers import (
    CLASSIFIERS,
    ClassifierName,
    FastNet,
    WideResNet,
    available_classifiers,
    build_classifier,
)
from fuse_lightning.nets.generators import (
    GENERATORS,
    EncoderDecoderGenerator,
    GeneratorName,
    UNetGenerator,
    available_generators,
    build_generator,
)
from fuse_lightning.nets.schedules import cosine_with_warmup

__all__ = [
    "CLASSIFIERS",
    "GENERATORS",
    "ClassifierName",
    "EncoderDecoderGenerator",
    "FastNet",
    "GeneratorName",
    "UNetGenerator",
    "WideResNet",
    "available_classifiers",
    "available_generators",
    "build_classifier",
    "build_generator",
    "cosine_with_warmup",
]
