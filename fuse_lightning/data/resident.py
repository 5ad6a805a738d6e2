"""DataModules whose splits are held in memory as uint8 tensors (CIFAR-sized data).

A batch is one tensor index (`TensorBatchDataset`), moved to the device as uint8 and converted and
augmented there (`on_after_batch_transfer`); on a GPU the whole split can stay on the device.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset

from fuse_lightning.data.base import (
    EpochSeededSampler,
    ImageClassificationDataModule,
    TensorBatchDataset,
    _apply_filter,
    _run_seed,
    passthrough_collate,
    random_crop_flip,
)
from fuse_lightning.filters import ImageFilter

__all__ = ["ResidentImageDataModule"]


class ResidentImageDataModule(ImageClassificationDataModule):
    """Image classification with the dataset resident in memory as uint8 tensors.

    Subclasses set the class constants (`mean`, `std`, `_num_classes`, `_image_shape`) and
    implement `_load_split` (and, to train on or write a protected copy, `_read_protected` and
    `write_train_set`). The attacker filters are applied once, in `setup`, to the stored uint8
    images.

    Args:
        data_dir: Directory holding the dataset (for CIFAR, the parent of `cifar-10-batches-py`).
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation, test and `protect_dataloader`.
        train_subset: Train on a class-stratified, seeded subset of this many training images
            (e.g. for CPU runs); None uses all. Applies to the protected copy when
            `protected_dir` is set.
        test_subset: Evaluate on a class-stratified, seeded subset of this many test images.
        subset_seed: Seed of the subset choice.
        exclude_subset: Leave out the training images that `train_subset` of this size picks
            before choosing `train_subset` (images a generator trained on that subset never saw).
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

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int = 512,
        train_subset: int | None = None,
        test_subset: int | None = None,
        subset_seed: int = 0,
        exclude_subset: int | None = None,
        augment: bool = True,
        pad_mode: Literal["zeros", "reflect"] = "zeros",
        train_filter: ImageFilter | str | None = None,
        test_filter: ImageFilter | str | None = None,
        protected_dir: str | None = None,
        download: bool = False,
        num_workers: int = 0,
        check_counts: bool = True,
        verify_manifest: bool = True,
        resident_on_device: bool = True,
    ) -> None:
        if pad_mode not in ("zeros", "reflect"):
            raise ValueError(f"pad_mode must be 'zeros' or 'reflect', got {pad_mode!r}")
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            train_subset=train_subset,
            test_subset=test_subset,
            subset_seed=subset_seed,
            exclude_subset=exclude_subset,
            augment=augment,
            train_filter=train_filter,
            test_filter=test_filter,
            protected_dir=protected_dir,
            num_workers=num_workers,
            verify_manifest=verify_manifest,
        )
        self.pad_mode = pad_mode
        self.crop_padding = 4
        self.download = download
        self.check_counts = check_counts
        self.resident_on_device = resident_on_device
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None
        self._source_train_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # ----------------------------------------------------------------- loading (the dataset's own)
    def _load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Load the source split ("train" / "test") as uint8 (N, C, H, W) and int64 (N,)."""
        raise NotImplementedError(f"{type(self).__name__} does not define _load_split")

    def _read_protected(self, directory: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Load a protected training set written by `write_train_set`."""
        raise NotImplementedError(f"{type(self).__name__} cannot read a protected copy")

    # ----------------------------------------------------------------- the resident splits
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
    @staticmethod
    def _take(
        split: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples of `split` at positions `idx` (all when None)."""
        return split if idx is None else (split[0][idx], split[1][idx])

    def _source_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._source_train_cache is None:
            self._source_train_cache = self._load_split("train")
        return self._source_train_cache

    def setup(self, stage: str | None = None) -> None:
        """Load (subset, filter) the test set, and the training set unless only evaluating."""
        if self._test is None:
            test = self._load_split("test")
            test = self._take(test, self._subset_indices(test[1], self.test_subset))
            self._test = (_apply_filter(test[0], self.test_filter), test[1])
        if stage in (None, "fit") and self._train is None:
            if self.protected_dir is not None:
                self._verify_protected()
                loaded = self._read_protected(self.protected_dir)
            else:
                loaded = self._source_train()
            self.train_indices = self._train_subset_indices(loaded[1])
            train = self._take(loaded, self.train_indices)
            self._train = (_apply_filter(train[0], self.train_filter), train[1])

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
        return self._loader(
            TensorBatchDataset(*self._resident("train", self._train)), self.batch_size, True,
            self._drop_last(len(self.train_labels)),
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

    def protect_dataloader(self, batch_size: int | None = None, use_subset: bool = False) -> DataLoader:
        """The clean source training set, unfiltered and un-augmented, in stored order.

        Yields `(images uint8, labels, index)` with `index` the position in the full set, as
        expected by `write_train_set`.

        Args:
            batch_size: Batch size; `eval_batch_size` when None.
            use_subset: Only the `train_subset` examples (same seeded choice) instead of all.
        """
        images, labels = self._source_train()
        dataset: Dataset = TensorBatchDataset(images, labels, return_index=True)
        idx = self._subset_indices(labels, self.train_subset) if use_subset else None
        if idx is not None:
            dataset = torch.utils.data.Subset(dataset, idx.tolist())
        return self._loader(dataset, batch_size or self.eval_batch_size, False)

    # ----------------------------------------------------------------- device-side transforms
    def _device_transform(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Random crop + flip of training batches (when `augment`), on the device."""
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
