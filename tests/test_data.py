"""Data package: CIFAR pickle I/O, resident DataModules, augmentation, ImageNet-subset trees."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

import fuse_lightning.data.cifar as cifar_module
from fuse_lightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DatasetFormatError,
    ImageNetSubsetDataModule,
    expected_counts,
    label_names,
    random_crop_flip,
    random_resized_crop_flip,
    read_cifar,
    stratified_subset_indices,
    write_cifar,
)

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------- helpers
def _make_split(num_classes: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    return data, labels


def _dump_bytes_keys(path: Path, entry: dict) -> None:
    """Pickle like the original archives: bytes keys and bytes strings."""
    with path.open("wb") as fh:
        pickle.dump({k.encode(): v for k, v in entry.items()}, fh, protocol=2)


def write_original_cifar10(root: Path, per_class: int = 20, test_per_class: int = 5):
    """Tiny CIFAR-10 in the original layout (5 train batches, bytes keys)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    data, labels = _make_split(10, per_class, seed=0)
    for i, chunk in enumerate(np.array_split(np.arange(len(labels)), 5)):
        _dump_bytes_keys(
            d / f"data_batch_{i + 1}",
            {
                "batch_label": f"training batch {i + 1} of 5".encode(),
                "labels": labels[chunk].tolist(),
                "data": data[chunk],
                "filenames": [f"img_{j}.png".encode() for j in chunk],
            },
        )
    test_data, test_labels = _make_split(10, test_per_class, seed=1)
    _dump_bytes_keys(
        d / "test_batch",
        {"batch_label": b"testing batch 1 of 1", "labels": test_labels.tolist(), "data": test_data},
    )
    _dump_bytes_keys(
        d / "batches.meta",
        {"label_names": [f"name{i}".encode() for i in range(10)], "num_vis": 3072},
    )
    return (data, labels), (test_data, test_labels)


def write_original_cifar100(root: Path, per_class: int = 2):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    data, labels = _make_split(100, per_class, seed=2)
    _dump_bytes_keys(
        d / "train",
        {"fine_labels": labels.tolist(), "coarse_labels": [0] * len(labels), "data": data},
    )
    test_data, test_labels = _make_split(100, 1, seed=3)
    _dump_bytes_keys(d / "test", {"fine_labels": test_labels.tolist(), "data": test_data})
    _dump_bytes_keys(d / "meta", {"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    return (data, labels), (test_data, test_labels)


class Invert(nn.Module):
    """Stand-in attacker filter with a known effect."""

    name = "invert"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 - x


@pytest.fixture
def cifar10_root(tmp_path: Path):
    return tmp_path, *write_original_cifar10(tmp_path)


@pytest.fixture
def tiny_counts(monkeypatch):
    """Let the DataModule accept the tiny generated sets as 'full' ones."""
    counts = {"train": 200, "test": 50}
    monkeypatch.setattr(cifar_module, "expected_counts", lambda variant, split: counts[split])
    return counts


# --------------------------------------------------------------------------- reader
def test_read_cifar10_original_layout(cifar10_root):
    root, (data, labels), (test_data, test_labels) = cifar10_root
    images, targets = read_cifar(root, "cifar10", "train")
    assert images.dtype == torch.uint8 and images.shape == (200, 3, 32, 32)
    assert targets.dtype == torch.int64 and targets.tolist() == labels.tolist()
    assert torch.equal(images.reshape(200, -1), torch.from_numpy(data))
    assert torch.bincount(targets).tolist() == [20] * 10
    test_images, test_targets = read_cifar(root, "cifar10", "test")
    assert test_images.shape == (50, 3, 32, 32) and test_targets.tolist() == test_labels.tolist()
    # The variant directory itself is accepted as root.
    again, _ = read_cifar(root / "cifar-10-batches-py", "cifar10", "train")
    assert torch.equal(again, images)
    assert label_names(root, "cifar10") == [f"name{i}" for i in range(10)]
    assert expected_counts("cifar10", "train") == 50000
    assert expected_counts("cifar100", "test") == 10000


def test_read_cifar100(tmp_path):
    (data, labels), _ = write_original_cifar100(tmp_path)
    images, targets = read_cifar(tmp_path, "cifar100", "train")
    assert images.shape == (200, 3, 32, 32)
    assert targets.tolist() == labels.tolist() and int(targets.max()) == 99
    assert torch.equal(images.reshape(200, -1), torch.from_numpy(data))
    assert label_names(tmp_path, "cifar100")[:2] == ["c0", "c1"]


def test_truncated_file_names_the_file(cifar10_root):
    root = cifar10_root[0]
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DatasetFormatError, match="data_batch_3"):
        read_cifar(root, "cifar10", "train")


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"data": np.zeros((4, 3072), np.float32), "labels": [0] * 4}, "uint8"),
        ({"data": np.zeros((4, 3000), np.uint8), "labels": [0] * 4}, "shape"),
        ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]}, r"\[0, 10\)"),
        ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1]}, "one label per row"),
        ({"data": np.zeros((4, 3072), np.uint8)}, "missing key 'labels'"),
    ],
)
def test_malformed_file_is_rejected(cifar10_root, entry, message):
    root = cifar10_root[0]
    path = root / "cifar-10-batches-py" / "test_batch"
    _dump_bytes_keys(path, entry)
    with pytest.raises(DatasetFormatError, match=message) as info:
        read_cifar(root, "cifar10", "test")
    assert "test_batch" in str(info.value)


def test_missing_directory_names_expected_path(tmp_path):
    with pytest.raises(DatasetFormatError) as info:
        read_cifar(tmp_path, "cifar10", "train")
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(info.value)
    dm = CIFAR10DataModule(data_dir=str(tmp_path))
    with pytest.raises(DatasetFormatError, match="cifar-10-batches-py"):
        dm.setup("fit")


# --------------------------------------------------------------------------- writer
def test_write_cifar_round_trip_and_torchvision(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (23, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(23) % 10
    paths = write_cifar(tmp_path, images, labels, "cifar10", label_names=list("abcdefghij"))
    assert [p.name for p in paths] == [f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta"]
    sizes = []
    for p in paths[:5]:
        with p.open("rb") as fh:
            entry = pickle.load(fh, encoding="latin1")  # how torchvision reads them
        assert {"batch_label", "labels", "data", "filenames"} <= set(entry)
        sizes.append(len(entry["labels"]))
    assert sizes == [5, 5, 5, 4, 4]
    back, back_labels = read_cifar(tmp_path, "cifar10", "train")
    assert torch.equal(back, images) and torch.equal(back_labels, labels)
    assert label_names(tmp_path, "cifar10") == list("abcdefghij")

    import torchvision

    # The checksums differ from the official archive; everything else is torchvision's own code.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    tv = torchvision.datasets.CIFAR10(str(tmp_path), train=True)
    assert tv.data.shape == (23, 32, 32, 3) and tv.targets == labels.tolist()
    assert np.array_equal(tv.data, back.permute(0, 2, 3, 1).numpy())
    assert tv.classes == list("abcdefghij")


def test_write_cifar100_round_trip(tmp_path):
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 5, 99, 3, 3, 50, 1])
    paths = write_cifar(tmp_path, images, labels, "cifar100")
    assert [p.name for p in paths] == ["train", "meta"]
    with paths[0].open("rb") as fh:
        entry = pickle.load(fh, encoding="latin1")
    assert entry["coarse_labels"] == [0] * 7
    back, back_labels = read_cifar(tmp_path, "cifar100", "train")
    assert torch.equal(back, images) and torch.equal(back_labels, labels)


# --------------------------------------------------------------------------- pure functions
def test_stratified_subset_indices():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)[torch.randperm(100)]
    idx = stratified_subset_indices(labels, 20, seed=0)
    assert len(idx) == 20 and torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == 20
    assert torch.bincount(labels[idx], minlength=3).tolist() == [12, 6, 2]
    assert torch.equal(idx, stratified_subset_indices(labels, 20, seed=0))
    assert not torch.equal(idx, stratified_subset_indices(labels, 20, seed=1))
    # Largest remainder: 7 * (0.6, 0.3, 0.1) = (4.2, 2.1, 0.7) -> (4, 2, 1).
    assert torch.bincount(labels[stratified_subset_indices(labels, 7)]).tolist() == [4, 2, 1]
    assert torch.equal(stratified_subset_indices(labels, 500), torch.arange(100))


def test_random_crop_flip_without_padding_is_identity_or_flip():
    x = torch.rand(64, 3, 8, 8)
    y = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(0))
    same = (y == x).flatten(1).all(1)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 10 < int(flipped.sum()) < 54  # both outcomes occur


def test_random_resized_crop_at_full_scale_is_identity_or_flip():
    x = torch.rand(64, 3, 16, 16)
    y = random_resized_crop_flip(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    same = torch.isclose(y, x, atol=1e-5).flatten(1).all(1)
    flipped = torch.isclose(y, x.flip(-1), atol=1e-5).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 10 < int(flipped.sum()) < 54  # both outcomes occur


def test_random_resized_crop_zooms_by_the_drawn_area():
    """A quarter-area square crop is a 2x zoom: a ramp of slope 1 per column becomes slope 1/2,
    its values stay inside the image's range, and gradients reach the input."""
    ramp = torch.arange(32.0).expand(8, 3, 32, 32).clone().requires_grad_(True)
    y = random_resized_crop_flip(ramp, scale=(0.25, 0.25), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    steps = (y[..., 1:] - y[..., :-1])[..., 2:-2]  # away from the border clamp
    assert torch.allclose(steps.abs(), torch.full_like(steps, 0.5), atol=1e-4)
    spans = y.detach().amax((1, 2, 3)) - y.detach().amin((1, 2, 3))
    assert torch.allclose(spans, torch.full_like(spans, 15.5), atol=1e-3)  # 16 source columns, zoomed
    y.sum().backward()
    assert ramp.grad is not None and ramp.grad.abs().sum() > 0


@pytest.mark.parametrize("scale", [(0.0, 1.0), (0.5, 0.2), (0.5, 1.5)])
def test_random_resized_crop_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop_flip(torch.rand(2, 3, 8, 8), scale=scale)


def _crop(image: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    crop = image[:, dy : dy + 10, dx : dx + 10]
    return crop.flip(-1) if flip else crop


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_random_crop_flip_is_a_shift_of_the_padded_image(pad_mode):
    x = torch.randint(0, 256, (16, 3, 10, 10), dtype=torch.uint8)
    y = random_crop_flip(
        x, padding=2, generator=torch.Generator().manual_seed(1), pad_mode=pad_mode
    )
    assert y.shape == x.shape and y.dtype == torch.uint8
    mode = "constant" if pad_mode == "zeros" else "reflect"
    padded = torch.nn.functional.pad(x.float(), (2, 2, 2, 2), mode=mode).to(torch.uint8)
    offsets = set()
    for i in range(16):
        matches = [
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if torch.equal(_crop(padded[i], dy, dx, flip), y[i])
        ]
        assert matches, f"image {i} is not a crop/flip of its padded input"
        offsets.add(matches[0][:2])
    assert len(offsets) > 3  # offsets vary across the batch


# --------------------------------------------------------------------------- CIFAR DataModule
def test_datamodule_subset_loaders_and_transfer(cifar10_root, tiny_counts):
    root = cifar10_root[0]
    dm = CIFAR10DataModule(
        data_dir=str(root), batch_size=7, eval_batch_size=32, train_subset=50, test_subset=20
    )
    assert (dm.num_classes, dm.image_shape, dm.image_size) == (10, (3, 32, 32), 32)
    assert dm.mean == (0.4914, 0.4822, 0.4465) and dm.train_filter_name == "none"
    dm.setup("fit")
    assert torch.bincount(dm.train_labels, minlength=10).tolist() == [5] * 10
    assert torch.bincount(dm.test_labels, minlength=10).tolist() == [2] * 10
    assert dm.train_images.dtype == torch.uint8 and dm.train_images.shape == (50, 3, 32, 32)

    batches = list(dm.train_dataloader())
    assert [len(b[1]) for b in batches] == [7] * 7  # the lone 50th example is dropped
    images, labels = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (7, 3, 32, 32)

    # Outside training: conversion only.
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.dtype == torch.float32 and torch.equal(x, images.float() / 255)
    assert torch.equal(y, labels)
    # While training: augmented, still in [0, 1].
    dm.trainer = SimpleNamespace(training=True)
    xa, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert xa.shape == (7, 3, 32, 32) and 0 <= float(xa.min()) and float(xa.max()) <= 1
    assert not torch.equal(xa, x)
    dm.augment = False
    assert torch.equal(dm.on_after_batch_transfer((images, labels), 0)[0], x)

    val = list(dm.val_dataloader())
    assert len(val) == 1 and torch.equal(val[0][1], dm.test_labels)


def test_exclude_subset_trains_only_on_images_the_subset_left_out(cifar10_root, tiny_counts):
    root, (data, _), _ = cifar10_root
    seen = CIFAR10DataModule(data_dir=str(root), train_subset=50)
    unseen = CIFAR10DataModule(data_dir=str(root), train_subset=50, exclude_subset=50)
    rest = CIFAR10DataModule(data_dir=str(root), exclude_subset=50)
    for dm in (seen, unseen, rest):
        dm.setup("fit")
    seen_idx, unseen_idx = set(seen.train_indices.tolist()), set(unseen.train_indices.tolist())
    assert len(seen_idx) == len(unseen_idx) == 50 and not seen_idx & unseen_idx
    # Still class-stratified, and the images are the source's at those positions.
    assert torch.bincount(unseen.train_labels, minlength=10).tolist() == [5] * 10
    assert torch.equal(unseen.train_images, torch.as_tensor(data).reshape(-1, 3, 32, 32)[unseen.train_indices])
    # Without train_subset: everything but the excluded 50.
    assert set(rest.train_indices.tolist()) == set(range(200)) - seen_idx
    with pytest.raises(ValueError, match="exclude_subset"):
        CIFAR10DataModule(data_dir=str(root), exclude_subset=0)
    with pytest.raises(ValueError, match="exclude_subset .200. leaves none"):
        CIFAR10DataModule(data_dir=str(root), exclude_subset=200).setup("fit")


def test_protect_dataloader_is_full_clean_and_ordered(cifar10_root, tiny_counts):
    root, (data, labels), _ = cifar10_root
    dm = CIFAR10DataModule(data_dir=str(root), train_subset=30, train_filter=Invert())
    dm.setup("fit")
    dm.trainer = SimpleNamespace(training=True)  # must not augment index batches
    seen = []
    for batch in dm.protect_dataloader(batch_size=64):
        x, y, idx = dm.on_after_batch_transfer(batch, 0)
        assert torch.equal(x, batch[0].float() / 255)
        seen.append((batch[0], y, idx))
    images = torch.cat([s[0] for s in seen])
    assert torch.equal(torch.cat([s[2] for s in seen]), torch.arange(200))
    assert torch.equal(images.reshape(200, -1), torch.from_numpy(data))  # unfiltered, stored order
    subset = list(dm.protect_dataloader(use_subset=True))
    assert torch.equal(subset[0][2], dm.train_indices)


def test_train_filter_is_applied_once_to_stored_images(cifar10_root, tiny_counts):
    root, (data, _), (test_data, _) = cifar10_root
    dm = CIFAR10DataModule(data_dir=str(root), train_filter=Invert())
    dm.setup("fit")
    assert dm.train_filter_name == "invert" and dm.test_filter_name == "none"
    assert torch.equal(dm.train_images.reshape(200, -1), 255 - torch.from_numpy(data))
    assert torch.equal(dm.test_images.reshape(50, -1), torch.from_numpy(test_data))


def test_protected_dir_swap(cifar10_root, tiny_counts, tmp_path_factory):
    root, (data, labels), _ = cifar10_root
    source = CIFAR10DataModule(data_dir=str(root))
    source.setup("fit")
    out = tmp_path_factory.mktemp("protected")
    protected = 255 - source.train_images
    written = source.write_train_set(out, protected, source.train_labels)
    assert written[-1].name == "batches.meta"

    dm = CIFAR10DataModule(data_dir=str(root), protected_dir=str(out), verify_manifest=False)
    dm.setup("fit")
    assert torch.equal(dm.train_images, protected)
    assert torch.equal(dm.train_labels, torch.from_numpy(labels))
    assert torch.equal(dm.test_images, source.test_images)  # test set stays the source's
    assert label_names(out, "cifar10") == label_names(root, "cifar10")

    sub = CIFAR10DataModule(data_dir=str(root), protected_dir=str(out), train_subset=40, verify_manifest=False)
    sub.setup("fit")
    assert torch.equal(sub.train_images, protected[sub.train_indices])
    assert torch.bincount(sub.train_labels).tolist() == [4] * 10


class _Recorder(L.LightningModule):
    """Linear model that records what the data hooks deliver."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3 * 32 * 32, 10)
        self.seen: list[tuple[str, torch.dtype, float, float, int]] = []

    def _step(self, stage: str, batch):
        x, y = batch
        self.seen.append((stage, x.dtype, float(x.min()), float(x.max()), len(y)))
        return nn.functional.cross_entropy(self.net(x.flatten(1)), y)

    def training_step(self, batch, batch_idx):
        return self._step("train", batch)

    def validation_step(self, batch, batch_idx):
        self._step("val", batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_receives_float_batches(cifar10_root, tiny_counts):
    dm = CIFAR10DataModule(data_dir=str(cifar10_root[0]), batch_size=32, train_subset=64)
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    stages = [s[0] for s in model.seen]
    assert stages == ["train", "train", "val"]
    assert all(s[1] == torch.float32 and 0 <= s[2] and s[3] <= 1 for s in model.seen)
    assert [s[4] for s in model.seen] == [32, 32, 50]


def test_full_set_count_is_checked(cifar10_root):
    dm = CIFAR10DataModule(data_dir=str(cifar10_root[0]))
    with pytest.raises(DatasetFormatError, match="expected 10000"):
        dm.setup("test")


def test_cifar100_datamodule(tmp_path, monkeypatch):
    write_original_cifar100(tmp_path)
    monkeypatch.setattr(cifar_module, "expected_counts", lambda v, s: 200 if s == "train" else 100)
    dm = CIFAR100DataModule(data_dir=str(tmp_path), train_subset=100)
    dm.setup(None)
    assert dm.num_classes == 100 and dm.std == (0.2673, 0.2564, 0.2762)
    assert torch.bincount(dm.train_labels).tolist() == [1] * 100
    assert len(dm.test_labels) == 100


# --------------------------------------------------------------------------- ImageNet subset
@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    from torchvision.io import write_png

    gen = torch.Generator().manual_seed(0)
    root = tmp_path / "imagenet"
    for split, count in (("train", 4), ("val", 2)):
        for c in range(4):
            folder = root / split / f"n0000{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = (40, 50) if i % 2 == 0 else (70, 64)
                img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
                write_png(img, str(folder / f"n0000{c}_{i}.png"))
    (root / "train" / "n00000" / "notes.txt").write_text("not an image")
    return root


def test_imagenet_class_selection(image_tree):
    dm = ImageNetSubsetDataModule(data_dir=str(image_tree), num_classes=3, image_size=32)
    assert dm.classes == ["n00000", "n00001", "n00002"] and dm.num_classes == 3
    explicit = ImageNetSubsetDataModule(data_dir=str(image_tree), classes=["n00003", "n00001"])
    assert explicit.num_classes == 2
    explicit.setup("fit")
    assert explicit.classes == ["n00003", "n00001"]
    assert [p.parent.name for p, _ in explicit.train_samples] == ["n00003"] * 4 + ["n00001"] * 4
    assert explicit.train_labels.tolist() == [0] * 4 + [1] * 4
    bad = ImageNetSubsetDataModule(data_dir=str(image_tree), classes=["n00001", "n99999"])
    with pytest.raises(DatasetFormatError, match=r"train.*n99999"):
        bad.setup("fit")
    too_many = ImageNetSubsetDataModule(data_dir=str(image_tree), num_classes=5)
    with pytest.raises(DatasetFormatError, match="only 4 class folders"):
        too_many.setup("fit")


def test_imagenet_loaders_and_device_filter(image_tree):
    dm = ImageNetSubsetDataModule(
        data_dir=str(image_tree),
        num_classes=3,
        image_size=32,
        batch_size=4,
        eval_batch_size=8,
        num_workers=0,
        train_subset=6,
        train_filter=Invert(),
    )
    assert dm.image_shape == (3, 32, 32) and dm.mean == (0.485, 0.456, 0.406)
    dm.setup("fit")
    assert torch.bincount(dm.train_labels).tolist() == [2, 2, 2]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32) and labels.shape == (4,)
    val_images, val_labels = next(iter(dm.val_dataloader()))
    assert val_images.shape == (6, 3, 32, 32) and val_labels.tolist() == [0, 0, 1, 1, 2, 2]
    # The train filter runs on the device while training only; the test filter is None.
    plain, _ = dm.on_after_batch_transfer((val_images, val_labels), 0)
    assert torch.equal(plain, val_images.float() / 255)
    dm.trainer = SimpleNamespace(training=True)
    filtered, _ = dm.on_after_batch_transfer((val_images, val_labels), 0)
    assert torch.allclose(filtered, 1 - plain, atol=1e-6)


def test_imagenet_protect_export_and_reload(image_tree, tmp_path):
    from torchvision.io import decode_image

    dm = ImageNetSubsetDataModule(
        data_dir=str(image_tree), num_classes=3, image_size=32, eval_batch_size=5, num_workers=0
    )
    first = list(dm.protect_dataloader())
    second = list(dm.protect_dataloader())
    images = torch.cat([b[0] for b in first])
    labels = torch.cat([b[1] for b in first])
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, torch.cat([b[0] for b in second]))  # deterministic
    assert torch.equal(torch.cat([b[2] for b in first]), torch.arange(12))
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4

    out = tmp_path / "protected"
    protected = 255 - images
    paths = dm.write_train_set(out, protected, labels)
    assert paths[0] == out / "train" / "n00000" / "n00000_0.png" and len(paths) == 12
    assert torch.equal(decode_image(str(paths[5])), protected[5])

    reloaded = ImageNetSubsetDataModule(
        data_dir=str(image_tree),
        num_classes=3,
        image_size=32,
        protected_dir=str(out),
        verify_manifest=False,
        augment=False,
        eval_batch_size=12,
        batch_size=12,
        num_workers=0,
    )
    reloaded.setup("fit")
    assert all(str(p).startswith(str(out)) for p, _ in reloaded.train_samples)
    assert torch.equal(reloaded.train_labels, labels)
    # Protected images already have image_size: the deterministic transform keeps them as is.
    batch, batch_labels = next(iter(reloaded.train_dataloader()))
    assert len(batch) == 12
    # The loader shuffles: match each image back to its protected original.
    for image, label in zip(batch, batch_labels, strict=True):
        hits = [i for i in range(12) if torch.equal(protected[i], image)]
        assert len(hits) == 1 and labels[hits[0]] == label
    val_paths = [p for p, _ in reloaded._test_samples]
    assert all(str(p).startswith(str(image_tree / "val")) for p in val_paths)


# --------------------------------------------------------------------------- real CIFAR-10
@pytest.mark.skipif(not (REAL_DATA / "cifar-10-batches-py").is_dir(), reason="real CIFAR-10 absent")
def test_real_cifar10_counts_and_balance():
    dm = CIFAR10DataModule(data_dir=str(REAL_DATA))
    dm.setup(None)
    assert dm.train_images.shape == (50000, 3, 32, 32) and dm.test_images.shape == (
        10000,
        3,
        32,
        32,
    )
    assert torch.bincount(dm.train_labels).tolist() == [5000] * 10
    assert torch.bincount(dm.test_labels).tolist() == [1000] * 10
    assert label_names(REAL_DATA, "cifar10")[:2] == ["airplane", "automobile"]


def test_imagenet_exclude_subset(image_tree):
    def train_paths(**kwargs):
        dm = ImageNetSubsetDataModule(data_dir=str(image_tree), num_classes=4, image_size=32, **kwargs)
        dm.setup("fit")
        return {p.name for p, _ in dm.train_samples}, dm.train_labels

    seen, _ = train_paths(train_subset=8)
    unseen, labels = train_paths(train_subset=8, exclude_subset=8)
    assert len(seen) == len(unseen) == 8 and not seen & unseen
    assert torch.bincount(labels, minlength=4).tolist() == [2] * 4
