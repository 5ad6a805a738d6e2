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


@pytest.fixture(scope="session")
def tiny_cifar10(tmp_path_factory) -> Path:
    """A CIFAR-10-format directory with 200 train / 100 test images (use check_counts false)."""
    root = tmp_path_factory.mktemp("tiny-c10-")
    train_labels = torch.arange(200) % 10
    test_labels = torch.arange(100) % 10
    write_cifar(root, structured_images(train_labels, seed=1), train_labels, "cifar10", "train")
    write_cifar(root, structured_images(test_labels, seed=2), test_labels, "cifar10", "test")
    return root


@pytest.fixture(scope="session")
def tiny_cifar100(tmp_path_factory) -> Path:
    """A CIFAR-100-format directory with 200 train / 100 test images."""
    root = tmp_path_factory.mktemp("tiny-c100-")
    train_labels = torch.arange(200) % 100
    test_labels = torch.arange(100) % 100
    write_cifar(root, structured_images(train_labels, seed=3), train_labels, "cifar100", "train")
    write_cifar(root, structured_images(test_labels, seed=4), test_labels, "cifar100", "test")
    return root


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
