"""Shared fixtures: tiny datasets written in the real on-disk formats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fuse_lightning.data.cifar_format import write_cifar

REPO = Path(__file__).resolve().parents[1]
REAL_CIFAR10 = REPO.parent / "shared" / "data"


def structured_images(labels: torch.Tensor, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 images whose colour depends on the label plus noise: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    base = torch.rand(10, 3, 1, 1, generator=g)[labels % 10] * 160 + 40
    noise = torch.randn(n, 3, size, size, generator=g) * 30
    return (base + noise).clamp(0, 255).to(torch.uint8)


def write_tiny_cifar(root: Path, variant: str, num_classes: int, seed: int) -> Path:
    """200 train / 100 test images in the variant's pickle layout (use check_counts false)."""
    for split, n, offset in (("train", 200, 0), ("test", 100, 1)):
        labels = torch.arange(n) % num_classes
        write_cifar(root, structured_images(labels, seed=seed + offset), labels, variant, split)
    return root


@pytest.fixture(scope="session")
def tiny_cifar10(tmp_path_factory) -> Path:
    """A CIFAR-10-format directory with 200 train / 100 test images."""
    return write_tiny_cifar(tmp_path_factory.mktemp("tiny-c10-"), "cifar10", 10, seed=1)


@pytest.fixture(scope="session")
def tiny_cifar100(tmp_path_factory) -> Path:
    """A CIFAR-100-format directory with 200 train / 100 test images."""
    return write_tiny_cifar(tmp_path_factory.mktemp("tiny-c100-"), "cifar100", 100, seed=3)


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory) -> Path:
    """An ILSVRC-style `train/` + `val/` PNG tree: 3 classes, mixed image sizes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny-imagenet-")
    g = torch.Generator().manual_seed(5)
    for split, per_class in (("train", 6), ("val", 2)):
        for c, wnid in enumerate(("n01440764", "n01443537", "n01484850")):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = (40, 52) if i % 2 else (70, 64)
                img = (torch.rand(h, w, 3, generator=g) * 80 + 60 * c).clamp(0, 255).to(torch.uint8)
                Image.fromarray(img.numpy()).save(folder / f"{wnid}_{i}.JPEG".replace(".JPEG", ".png"))
    return root
