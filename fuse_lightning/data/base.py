"""The shared base of the project's DataModules, and helpers for sets held in memory.

`ImageClassificationDataModule` holds what every dataset shares: the constructor arguments
(subsets, attacker filters, a protected copy), the properties the models are linked to, the
uint8 -> float conversion on the device and the interface of the export (`protect_dataloader`,
`write_train_set`). Its subclasses load their data: `ResidentImageDataModule`
(`fuse_lightning.data.resident`, CIFAR) keeps a split in one uint8 tensor, the ImageNet subset
(`fuse_lightning.data.imagenet`) decodes files in worker processes.

The whole split of a resident set lives in one uint8 tensor (as in airbench): a batch is one tensor
index, moved to the device as uint8 (4x less traffic than float) and converted / augmented there.
No worker processes are needed for CIFAR-sized data.

Protocol notes (unlearnable examples):
- Validation and test both use the clean test set: the quantity of interest is the clean test
  accuracy of a model trained on (possibly protected) training data.
- The attacker's preprocessing filters (`train_filter`, `test_filter`) act as if the attacker had
  filtered the images and saved them: the result is re-quantised to uint8 like any saved image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fuse_lightning.filters import ImageFilter, filter_from_name, parse_filter_name

__all__ = [
    "EpochSeededSampler",
    "ImageClassificationDataModule",
    "TensorBatchDataset",
    "filter_name",
    "passthrough_collate",
    "random_crop_flip",
    "random_resized_crop_flip",
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


def random_resized_crop_flip(
    x: torch.Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip per image, resampled back to the input size.

    Differentiable in `x` (one affine `grid_sample`, bilinear), so a loss on the augmented image
    reaches a perturbation added before it. Each image gets a crop covering a share of the area
    drawn uniformly from `scale`, with an aspect ratio log-uniform in `ratio` (both sides capped
    at the full image), at a uniform position, mirrored with probability 1/2: torchvision's
    `RandomResizedCrop` distribution, without its retry loop.

    Args:
        x: Float images (N, C, H, W).
        scale: Range of the crop's area as a fraction of the image.
        ratio: Range of the crop's width / height.
        generator: Optional random generator (on `x`'s device) for reproducible draws.

    Returns:
        Tensor of the same shape as `x`.
    """
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
    n, dev = x.shape[0], x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, device=dev, generator=generator)

    area = uniform(*scale)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    # Half-sizes in grid_sample's normalised coordinates, where the image spans [-1, 1].
    half_w = torch.sqrt(area * aspect).clamp(max=1.0)
    half_h = torch.sqrt(area / aspect).clamp(max=1.0)
    centre_x = (1 - half_w) * uniform(-1.0, 1.0)
    centre_y = (1 - half_h) * uniform(-1.0, 1.0)
    flip = torch.where(torch.rand(n, device=dev, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = half_w * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = half_h
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


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
    """What every image-classification DataModule of the project shares.

    Subclasses set the class constants (`mean`, `std`, `_num_classes`, `_image_shape`) and load
    their data: `setup`, the dataloaders, `train_labels` / `test_labels`, and for the export
    `protect_dataloader` and `write_train_set`.

    The constructor arguments are saved as hyperparameters (in checkpoints, not in the logs), so
    a checkpoint alone describes its data (`fuse protect --ckpt`).

    Args:
        data_dir: Directory holding the dataset.
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation, test and `protect_dataloader`.
        train_subset: Train on a class-stratified, seeded subset of this many training images
            (e.g. for CPU runs); None uses all. Applies to the protected copy when
            `protected_dir` is set.
        test_subset: Evaluate on a class-stratified, seeded subset of this many test images.
        subset_seed: Seed of the subset choice.
        exclude_subset: Leave out the training images that `train_subset` of this size picks
            (same `subset_seed`) before choosing `train_subset` from the rest: a victim trained
            with `exclude_subset` = the generator's `train_subset` sees only images the
            generator never saw. None leaves nothing out.
        augment: Augment training batches (what that means is the dataset's choice).
        train_filter: Attacker preprocessing of the training images, as a filter (e.g.
            `LowPass`) or its name (e.g. "lowpass-ideal-0.25", "jpeg-10"): the attacker filters
            and saves them. None leaves them untouched.
        test_filter: Same for the test images (an attacker who also filters at inference).
        protected_dir: Directory with a protected copy of the training set in the dataset's own
            on-disk format (as written by `write_train_set`); replaces the training set. The test
            set always comes from `data_dir`.
        num_workers: DataLoader worker processes.
        verify_manifest: Check `protected_dir` against its `manifest.json` before reading it
            (missing, changed or unlisted files are an error); false skips the check.
    """

    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    _num_classes: int = 0
    _image_shape: tuple[int, int, int] = (3, 32, 32)
    # Whether `write_train_set` may be called batch by batch (one file per image) instead of once
    # with the whole set.
    streaming_export: bool = False

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
        train_filter: ImageFilter | str | None = None,
        test_filter: ImageFilter | str | None = None,
        protected_dir: str | None = None,
        num_workers: int = 0,
        verify_manifest: bool = True,
    ) -> None:
        super().__init__()
        if exclude_subset is not None and exclude_subset <= 0:
            raise ValueError(f"data.exclude_subset must be positive or null, got {exclude_subset}")
        # The arguments of the subclass's constructor (the CLI's config when built by it); the
        # filters by name, so that a checkpoint holds plain data only.
        self.save_hyperparameters(ignore=["train_filter", "test_filter"], logger=False)
        for key, value in (("train_filter", train_filter), ("test_filter", test_filter)):
            self.hparams[key] = value if value is None or isinstance(value, str) else filter_name(value)
        # The class too (as LightningCLI records it), also when built without the CLI.
        self.hparams.setdefault("_class_path", f"{type(self).__module__}.{type(self).__qualname__}")
        self.data_dir = str(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.subset_seed = subset_seed
        self.exclude_subset = exclude_subset
        self.augment = augment
        # A filter may be given by name ("lowpass-ideal-0.25", "jpeg-10"), as sweeps do.
        self.train_filter = filter_from_name(train_filter) if isinstance(train_filter, str) else train_filter
        self.test_filter = filter_from_name(test_filter) if isinstance(test_filter, str) else test_filter
        self.protected_dir = protected_dir
        self.num_workers = num_workers
        self.verify_manifest = verify_manifest
        self.train_indices: torch.Tensor | None = None  # positions of the subset in the loaded set

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

    @property
    def train_labels(self) -> torch.Tensor:
        """Labels of the training set in use (after the protected swap and the subset), int64 (N,)."""
        raise NotImplementedError(f"{type(self).__name__} does not define train_labels")

    @property
    def test_labels(self) -> torch.Tensor:
        """Labels of the test set in use (after the subset), int64 (N,)."""
        raise NotImplementedError(f"{type(self).__name__} does not define test_labels")

    def _require(self, split: Any, what: str) -> Any:
        if split is None:
            raise RuntimeError(f"{what} is not loaded; call setup() first")
        return split

    # ----------------------------------------------------------------- shared steps
    def _subset_indices(self, labels: torch.Tensor, size: int | None) -> torch.Tensor | None:
        """The seeded class-stratified choice of `size` examples; None when all are kept."""
        if size is None or size >= len(labels):
            return None
        return stratified_subset_indices(labels, size, self.subset_seed)

    def _train_subset_indices(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Positions of the training examples in use: the `train_subset` choice among those
        `exclude_subset` leaves; None when all are kept."""
        if self.exclude_subset is None:
            return self._subset_indices(labels, self.train_subset)
        if self.exclude_subset >= len(labels):
            raise ValueError(
                f"data.exclude_subset ({self.exclude_subset}) leaves none of the {len(labels)} training images"
            )
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[stratified_subset_indices(labels, self.exclude_subset, self.subset_seed)] = False
        rest = torch.nonzero(keep).reshape(-1)
        chosen = self._subset_indices(labels[rest], self.train_subset)
        return rest if chosen is None else rest[chosen]

    def _verify_protected(self) -> None:
        """Check `protected_dir` against its manifest unless `verify_manifest` is false."""
        if self.verify_manifest and self.protected_dir is not None:
            from fuse_lightning.manifest import verify_manifest

            verify_manifest(self.protected_dir)

    def _drop_last(self, num_train: int) -> bool:
        # Drop only a lone trailing example: BatchNorm cannot normalise a batch of one.
        return num_train % self.batch_size == 1

    def test_dataloader(self) -> DataLoader:
        """Same as `val_dataloader` (unlearnable examples are judged by clean test accuracy)."""
        return self.val_dataloader()

    # ----------------------------------------------------------------- export
    def protect_dataloader(self, batch_size: int | None = None, use_subset: bool = False) -> DataLoader:
        """The clean source training set, unfiltered and un-augmented, in stored order.

        Yields `(images uint8, labels, index)` with `index` the position in the full source set,
        as expected by `write_train_set`.

        Args:
            batch_size: Batch size; `eval_batch_size` when None.
            use_subset: Only the `train_subset` examples (same seeded choice) instead of all.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be exported (no protect_dataloader)")

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
        raise NotImplementedError(f"{type(self).__name__} cannot be exported (no write_train_set)")

    # ----------------------------------------------------------------- device-side transforms
    def _device_transform(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Per-batch transform on the device after the uint8 -> float conversion (none here)."""
        return x

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 -> float32 in [0, 1] on the device, then `_device_transform`.

        Batches with an index (`protect_dataloader`) are only converted.
        """
        images, labels, *rest = batch
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        if not rest:
            training = self.trainer is not None and self.trainer.training
            x = self._device_transform(x, training)
        return (x, labels, *rest)
