"""Base DataModule for image-classification sets held in memory as uint8 tensors.

The whole split lives in one uint8 tensor (as in airbench): a batch is one tensor index, moved to
the device as uint8 (4x less traffic than float) and converted / augmented there. No worker
processes are needed for CIFAR-sized data.

Protocol notes (unlearnable examples):
- Validation and test both use the clean test set: the quantity of interest is the clean test
  accuracy of a model trained on (possibly protected) training data.
- The attacker's preprocessing filters (`train_filter`, `test_filter`) are applied once, in
  `setup`, to the stored uint8 images: the attacker filters the images and saves them, so the
  result is re-quantised to uint8 like any saved image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fuse_lightning.filters import ImageFilter, filter_from_name, parse_filter_name

__all__ = [
    "ImageClassificationDataModule",
    "TensorBatchDataset",
    "filter_name",
    "passthrough_collate",
    "random_crop_flip",
    "stratified_subset_indices",
]


def random_crop_flip(
    x: torch.Tensor,
    padding: int = 4,
    generator: torch.Generator | None = None,
    pad_mode: str = "zeros",
) -> torch.Tensor:
    """Random translation (pad + crop back to size) and random horizontal flip, per image.

    Vectorised: the batch is padded once and every output pixel is gathered from a per-image
    offset; flipping reverses the column index, so both happen in one `gather` with no Python
    loop over images.

    Args:
        x: Images (N, C, H, W), any float or integer dtype.
        padding: Pixels of padding on each side; offsets are uniform in [0, 2 * padding].
        generator: Optional random generator (on `x`'s device) for reproducible draws.
        pad_mode: "zeros" (torchvision `RandomCrop(padding=4)`, the usual unlearnable-examples
            protocol) or "reflect" (airbench).

    Returns:
        Tensor of the same shape and dtype as `x`.
    """
    n, c, h, w = x.shape
    if padding > 0:
        if pad_mode == "zeros":
            xp = F.pad(x, (padding,) * 4)
        elif pad_mode == "reflect":
            xp = F.pad(
                x.float() if not x.is_floating_point() else x, (padding,) * 4, mode="reflect"
            )
            xp = xp.to(x.dtype)
        else:
            raise ValueError(f"pad_mode must be 'zeros' or 'reflect', got {pad_mode!r}")
    else:
        xp = x
    dev = x.device
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=dev, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=dev, generator=generator)
    flip = torch.rand((n, 1), device=dev, generator=generator) < 0.5
    rows = dy + torch.arange(h, device=dev)  # (N, H)
    cols_fwd = torch.arange(w, device=dev)
    cols = dx + torch.where(flip, cols_fwd.flip(0), cols_fwd)  # (N, W)
    wp = xp.shape[-1]
    out = xp.gather(2, rows[:, None, :, None].expand(n, c, h, wp))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def stratified_subset_indices(labels: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Seeded class-stratified subset: class proportions are kept (largest-remainder rounding).

    Args:
        labels: Class index per example (N,).
        size: Number of examples to keep; the full range is returned when `size >= N`.
        seed: Seed of the random choice within each class.

    Returns:
        Sorted int64 indices into `labels` (stored order is preserved).
    """
    labels = labels.reshape(-1).cpu()
    total = len(labels)
    if size <= 0:
        raise ValueError(f"subset size must be positive, got {size}")
    if size >= total:
        return torch.arange(total)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * size / total
    quota = exact.floor().long()
    # Hand the remaining slots to the classes with the largest fractional parts (stable order).
    rest = size - int(quota.sum())
    order = torch.argsort(exact - quota, descending=True, stable=True)
    quota[order[:rest]] += 1
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for cls, k in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == cls).reshape(-1)
        picked.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.sort(torch.cat(picked)).values


def filter_name(f: Any) -> str:
    """Short name of a filter for logs and run names; "none" when there is no filter.

    A filter given by name is returned in its canonical spelling (`parse_filter_name`).
    """
    if f is None:
        return "none"
    if isinstance(f, str):
        return parse_filter_name(f).name
    return str(getattr(f, "name", type(f).__name__))


def passthrough_collate(batch: Any) -> Any:
    """Collate for `TensorBatchDataset`: `__getitems__` already returns a stacked batch."""
    return batch


class TensorBatchDataset(Dataset):
    """Dataset over resident tensors whose `__getitems__` returns a whole batch at once.

    The DataLoader fetcher calls `__getitems__(indices)` when it exists, so a batch costs one
    tensor index instead of one Python call per item; with `passthrough_collate` the result is
    used as is. Samplers (including Lightning's DistributedSampler) work unchanged.

    Args:
        images: uint8 images (N, C, H, W).
        labels: int64 labels (N,).
        return_index: Also yield the position of each example in `images`.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, return_index: bool = False):
        if len(images) != len(labels):
            raise ValueError(f"got {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.return_index = return_index

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        if self.return_index:
            return self.images[i], self.labels[i], i
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.return_index:
            return self.images[idx], self.labels[idx], idx
        return self.images[idx], self.labels[idx]


class EpochSeededSampler(torch.utils.data.Sampler[int]):
    """Random order drawn from `(seed, epoch)` alone, so a resumed run sees the same batches.

    Lightning calls `set_epoch` at the start of every training epoch; the order of epoch `e` is
    the same whether the run got there directly or was restarted from a checkpoint.

    Args:
        num_samples: Dataset length.
        seed: Base seed.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


def _run_seed(default: int) -> int:
    """The run's seed (`seed_everything`), or `default` when none was set."""
    import os

    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value not in (None, "") else default


def _apply_filter(images: torch.Tensor, f: ImageFilter | None) -> torch.Tensor:
    if filter_name(f) == "none":  # also skips an explicit identity filter
        return images
    from fuse_lightning.filters import apply_filter_uint8

    return apply_filter_uint8(images, f)


class ImageClassificationDataModule(L.LightningDataModule):
    """Image classification with the dataset resident in memory as uint8 tensors.

    Subclasses set the class constants (`mean`, `std`, `_num_classes`, `_image_shape`) and
    implement `_load_split`, `_read_protected` and `write_train_set`.

    Args:
        data_dir: Directory holding the dataset (for CIFAR, the parent of `cifar-10-batches-py`).
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation, test and `protect_dataloader`.
        train_subset: Train on a class-stratified, seeded subset of this many training images
            (e.g. for CPU runs); None uses all. Applies to the protected copy when
            `protected_dir` is set.
        test_subset: Evaluate on a class-stratified, seeded subset of this many test images.
        subset_seed: Seed of the subset choice.
        augment: Random crop (4-pixel padding) + horizontal flip of training batches, done per
            batch on the device.
        pad_mode: Padding of the random crop: "zeros" (torchvision `RandomCrop(32, padding=4)`,
            the unlearnable-examples protocol) or "reflect" (airbench).
        train_filter: Attacker preprocessing of the training images, as a filter (e.g.
            `LowPass`) or its name (e.g. "lowpass-ideal-0.25", "jpeg-10"); applied once in `setup` to the stored uint8 images: the attacker filters and saves
            them. None leaves them untouched.
        test_filter: Same for the test images (an attacker who also filters at inference).
        protected_dir: Directory with a protected copy of the training set in the same on-disk
            format (as written by `write_train_set`); replaces the training set. The test set
            always comes from `data_dir`.
        download: Download the dataset into `data_dir` when it is missing.
        num_workers: DataLoader worker processes; 0 is right for resident data.
        check_counts: Require the full official split sizes (CIFAR: 50000/10000); disable for
            a deliberately smaller copy in the same format (e.g. generated test data).
        verify_manifest: Check `protected_dir` against its `manifest.json` before reading it
            (missing, changed or unlisted files are an error); false skips the check.
        resident_on_device: On a GPU, keep the training and test tensors on the device (uint8,
            moved once); batches are then gathered there and nothing crosses PCIe per step. Only
            with `num_workers: 0`. CPU runs are unaffected.
    """

    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    _num_classes: int = 0
    _image_shape: tuple[int, int, int] = (3, 32, 32)

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int = 512,
        train_subset: int | None = None,
        test_subset: int | None = None,
        subset_seed: int = 0,
        augment: bool = True,
        pad_mode: str = "zeros",
        train_filter: ImageFilter | str | None = None,
        test_filter: ImageFilter | str | None = None,
        protected_dir: str | None = None,
        download: bool = False,
        num_workers: int = 0,
        check_counts: bool = True,
        verify_manifest: bool = True,
        resident_on_device: bool = True,
    ) -> None:
        super().__init__()
        if pad_mode not in ("zeros", "reflect"):
            raise ValueError(f"pad_mode must be 'zeros' or 'reflect', got {pad_mode!r}")
        self.data_dir = str(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.subset_seed = subset_seed
        self.augment = augment
        self.pad_mode = pad_mode
        self.crop_padding = 4
        # A filter may be given by name ("lowpass-ideal-0.25", "jpeg-10"), as sweeps do.
        self.train_filter = filter_from_name(train_filter) if isinstance(train_filter, str) else train_filter
        self.test_filter = filter_from_name(test_filter) if isinstance(test_filter, str) else test_filter
        self.protected_dir = protected_dir
        self.download = download
        self.num_workers = num_workers
        self.check_counts = check_counts
        self.verify_manifest = verify_manifest
        self.resident_on_device = resident_on_device
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None
        self._source_train_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.train_indices: torch.Tensor | None = None  # positions of the subset in the loaded set

    # ----------------------------------------------------------------- subclass interface
    def _load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Load the source split ("train" / "test") as uint8 (N, C, H, W) and int64 (N,)."""
        raise NotImplementedError

    def _read_protected(self, directory: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Load a protected training set written by `write_train_set`."""
        raise NotImplementedError

    def write_train_set(
        self,
        out_dir: str | Path,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor | None = None,
    ) -> list[Path]:
        """Export a (protected) training set in the dataset's own on-disk format.

        Args:
            out_dir: Destination; pass it as `protected_dir` to train on the copy.
            images_uint8: uint8 images (N, C, H, W).
            labels: int64 labels (N,).
            indices: Positions of the images in the source training set (the index yielded by
                `protect_dataloader`); None means 0..N-1.

        Returns:
            Paths of the written files.
        """
        raise NotImplementedError

    # ----------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self._num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of the images the model sees."""
        return self._image_shape

    @property
    def image_size(self) -> int:
        """Image height (= width) in pixels."""
        return self.image_shape[1]

    @property
    def train_filter_name(self) -> str:
        return filter_name(self.train_filter)

    @property
    def test_filter_name(self) -> str:
        return filter_name(self.test_filter)

    def _require(self, split: tuple[torch.Tensor, torch.Tensor] | None, what: str):
        if split is None:
            raise RuntimeError(f"{what} is not loaded; call setup() first")
        return split

    @property
    def train_images(self) -> torch.Tensor:
        """Training images as stored after subset and filter: uint8 (N, C, H, W)."""
        return self._require(self._train, "the training set")[0]

    @property
    def train_labels(self) -> torch.Tensor:
        """Training labels, int64 (N,)."""
        return self._require(self._train, "the training set")[1]

    @property
    def test_images(self) -> torch.Tensor:
        """Test images after subset and filter: uint8 (N, C, H, W)."""
        return self._require(self._test, "the test set")[0]

    @property
    def test_labels(self) -> torch.Tensor:
        """Test labels, int64 (N,)."""
        return self._require(self._test, "the test set")[1]

    # ----------------------------------------------------------------- setup
    def _subset(
        self, split: tuple[torch.Tensor, torch.Tensor], size: int | None
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        images, labels = split
        if size is None or size >= len(labels):
            return split, None
        idx = stratified_subset_indices(labels, size, self.subset_seed)
        return (images[idx], labels[idx]), idx

    def _source_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._source_train_cache is None:
            self._source_train_cache = self._load_split("train")
        return self._source_train_cache

    def setup(self, stage: str | None = None) -> None:
        """Load (subset, filter) the test set, and the training set unless only evaluating."""
        if self._test is None:
            test, _ = self._subset(self._load_split("test"), self.test_subset)
            self._test = (_apply_filter(test[0], self.test_filter), test[1])
        if stage in (None, "fit") and self._train is None:
            if self.protected_dir is not None:
                self._verify_protected()
                loaded = self._read_protected(self.protected_dir)
            else:
                loaded = self._source_train()
            train, self.train_indices = self._subset(loaded, self.train_subset)
            self._train = (_apply_filter(train[0], self.train_filter), train[1])

    def _verify_protected(self) -> None:
        """Check `protected_dir` against its manifest unless `verify_manifest` is false."""
        if self.verify_manifest and self.protected_dir is not None:
            from fuse_lightning.manifest import verify_manifest

            verify_manifest(self.protected_dir)

    # ----------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False):
        sampler = EpochSeededSampler(len(dataset), _run_seed(self.subset_seed)) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=passthrough_collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self._train is None:
            self.setup("fit")
        n = len(self.train_labels)
        # Drop only a lone trailing example: BatchNorm cannot normalise a batch of one.
        return self._loader(
            TensorBatchDataset(*self._resident("train", self._train)), self.batch_size, True,
            n % self.batch_size == 1,
        )

    def val_dataloader(self) -> DataLoader:
        """The clean test set (unlearnable examples are judged by clean test accuracy)."""
        if self._test is None:
            self.setup("validate")
        return self._loader(TensorBatchDataset(*self._resident("test", self._test)), self.eval_batch_size, False)

    def _resident(self, name: str, split: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The split moved once to the trainer's GPU (see `resident_on_device`), else as is."""
        trainer = getattr(self, "trainer", None)
        device = getattr(getattr(trainer, "strategy", None), "root_device", None)
        if not self.resident_on_device or self.num_workers > 0 or device is None or device.type != "cuda":
            return split
        cached = self._on_device.get(name)
        if cached is None or cached[0].device != device or len(cached[1]) != len(split[1]):
            # why: uint8 is 4x smaller than float; the whole CIFAR training set is 150 MB.
            cached = (split[0].to(device), split[1].to(device))
            self._on_device[name] = cached
        return cached

    def test_dataloader(self) -> DataLoader:
        """Same as `val_dataloader`."""
        return self.val_dataloader()

    def protect_dataloader(
        self, batch_size: int | None = None, use_subset: bool = False
    ) -> DataLoader:
        """The clean source training set, unfiltered and un-augmented, in stored order.

        Yields `(images uint8, labels, index)` with `index` the position in the full set, as
        expected by `write_train_set`.

        Args:
            batch_size: Batch size; `eval_batch_size` when None.
            use_subset: Only the `train_subset` examples (same seeded choice) instead of all.
        """
        images, labels = self._source_train()
        dataset: Dataset = TensorBatchDataset(images, labels, return_index=True)
        if use_subset and self.train_subset is not None and self.train_subset < len(labels):
            idx = stratified_subset_indices(labels, self.train_subset, self.subset_seed)
            dataset = torch.utils.data.Subset(dataset, idx.tolist())
        return self._loader(dataset, batch_size or self.eval_batch_size, False)

    # ----------------------------------------------------------------- device-side transforms
    def _device_transform(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Per-batch transform on the device after the uint8 -> float conversion."""
        if training and self.augment:
            return random_crop_flip(x, self.crop_padding, generator=self._augment_generator(x.device),
                                    pad_mode=self.pad_mode)
        return x

    def _augment_generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded by (run seed, epoch, global step): a resumed run draws the same crops."""
        trainer = getattr(self, "trainer", None)
        epoch, step = getattr(trainer, "current_epoch", None), getattr(trainer, "global_step", None)
        if not isinstance(epoch, int) or not isinstance(step, int):
            return None
        seed = _run_seed(self.subset_seed) * 1_000_003 + epoch * 100_003 + step
        return torch.Generator(device=device).manual_seed(seed % 2**63)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 -> float32 in [0, 1] on the device, then augmentation of training batches.

        Batches with an index (`protect_dataloader`) are only converted.
        """
        images, labels, *rest = batch
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        if not rest:
            training = self.trainer is not None and self.trainer.training
            x = self._device_transform(x, training)
        return (x, labels, *rest)
