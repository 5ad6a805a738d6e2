"""ImageNet class subset (e.g. ImageNet-100) read from an ImageFolder tree, decoded on the fly.

Layout under `data_dir` (the usual ILSVRC layout, validation images sorted into class folders):

    train/n01440764/*.JPEG ...
    val/n01440764/*.JPEG ...

Unlike CIFAR the images are not resident: workers decode them and apply the spatial transforms
(torchvision.transforms.v2 on uint8 tensors); the attacker filters run per batch on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fuse_lightning.data.base import ImageClassificationDataModule, filter_name
from fuse_lightning.data.cifar_format import DatasetFormatError
from fuse_lightning.filters import ImageFilter

__all__ = [
    "ImageFileDataset",
    "ImageNetSubsetDataModule",
    "ResizeCenterCrop",
    "list_image_folder",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def list_image_folder(root: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """`(path, label)` for every image of `root/<class>/`, classes in the given order, files sorted.

    Raises:
        DatasetFormatError: A class folder is missing or holds no images.
    """
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise DatasetFormatError(f"{folder}: class folder not found (expected {root}/<class>/)")
        files = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
        )
        if not files:
            raise DatasetFormatError(f"{folder}: no images ({', '.join(IMG_EXTENSIONS)})")
        samples.extend((p, label) for p in files)
    return samples


def read_image_uint8(path: Path) -> torch.Tensor:
    """Decode an image file to uint8 RGB (3, H, W)."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        # A few ILSVRC files (CMYK JPEGs, a PNG named .JPEG) trip the fast decoder; PIL copes.
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class ImageFileDataset(Dataset):
    """Decoded, transformed images from a list of files.

    Args:
        samples: `(path, label)` pairs.
        transform: Callable on a uint8 (3, H, W) tensor returning uint8 (3, S, S).
        return_index: Also yield the position of the sample in `samples`.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        transform: Callable[[torch.Tensor], torch.Tensor],
        return_index: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.return_index = return_index

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        path, label = self.samples[i]
        image = self.transform(read_image_uint8(path))
        if self.return_index:
            return image, label, i
        return image, label


def train_transform(image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """RandomResizedCrop + horizontal flip on uint8 tensors (standard ImageNet training)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])


class ResizeCenterCrop:
    """Resize the short side to `size * 256 / 224`, then center-crop `size` (ImageNet evaluation).

    Images that already are `size` x `size` (exported protected copies) pass unchanged, so a
    protected copy is read back exactly as it was written.

    Args:
        size: Output side in pixels.
    """

    def __init__(self, size: int) -> None:
        from torchvision.transforms import v2

        self.size = size
        self.transform = v2.Compose(
            [v2.Resize(int(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
        )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) == (self.size, self.size):
            return image
        return self.transform(image)


def eval_transform(image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Deterministic resize + center crop (see `ResizeCenterCrop`)."""
    return ResizeCenterCrop(image_size)


class ImageNetSubsetDataModule(ImageClassificationDataModule):
    """A class subset of ImageNet (ImageFolder layout), decoded by worker processes.

    Training batches get RandomResizedCrop + flip in the workers; evaluation batches get
    resize + center crop. Batches travel as uint8 and are converted to float on the device,
    where the attacker filters are applied per batch (`train_filter` while training,
    `test_filter` otherwise) and re-quantised to 8 bits, as if the attacker had filtered and
    saved the images.

    Args:
        data_dir: Directory containing `train/` and `val/`, each with one folder per class
            (e.g. `n01440764`).
        num_classes: Use the first `num_classes` class folders of `train/` in sorted order.
        classes: Explicit list of class folder names; overrides `num_classes`.
        image_size: Side of the square images the model sees.
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation, test and `protect_dataloader`.
        train_subset: Total number of training images to keep, chosen class-stratified and
            seeded (so roughly `train_subset / num_classes` per class); None keeps all. Applies to
            the protected copy when `protected_dir` is set.
        test_subset: Same for the validation images.
        subset_seed: Seed of the subset choice.
        exclude_subset: Leave out the training images that `train_subset` of this size picks
            before choosing `train_subset` (images a generator trained on that subset never saw).
        augment: RandomResizedCrop + flip for training; False uses the evaluation transform.
        train_filter: Attacker preprocessing of training batches, applied on the device.
        test_filter: Attacker preprocessing of evaluation batches, applied on the device.
        protected_dir: A protected copy of the training images as written by `write_train_set`
            (`<protected_dir>/train/<class>/<stem>.png`); validation stays the source's.
        num_workers: DataLoader worker processes for decoding.
        verify_manifest: Check `protected_dir` against its `manifest.json` before reading it.
    """

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        num_classes: int = 100,
        classes: list[str] | None = None,
        image_size: int = 224,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        train_subset: int | None = None,
        test_subset: int | None = None,
        subset_seed: int = 0,
        exclude_subset: int | None = None,
        augment: bool = True,
        train_filter: ImageFilter | str | None = None,
        test_filter: ImageFilter | str | None = None,
        protected_dir: str | None = None,
        num_workers: int = 4,
        verify_manifest: bool = True,
    ) -> None:
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
        if classes is None and num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.requested_classes = list(classes) if classes is not None else None
        self._num_classes = len(classes) if classes is not None else num_classes
        self._image_shape = (3, image_size, image_size)
        self._classes: list[str] | None = None
        self._train_samples: list[tuple[Path, int]] | None = None
        self._test_samples: list[tuple[Path, int]] | None = None

    # ----------------------------------------------------------------- file lists
    @property
    def classes(self) -> list[str]:
        """Class folder names in label order."""
        if self._classes is None:
            train_root = Path(self.data_dir) / "train"
            if not train_root.is_dir():
                raise DatasetFormatError(
                    f"{train_root}: not found; expected an ImageFolder tree "
                    f"{self.data_dir}/train/<class>/*.JPEG and {self.data_dir}/val/<class>/*.JPEG"
                )
            available = sorted(p.name for p in train_root.iterdir() if p.is_dir())
            if self.requested_classes is not None:
                unknown = [c for c in self.requested_classes if c not in available]
                if unknown:
                    raise DatasetFormatError(f"{train_root}: unknown class folders {unknown}")
                self._classes = list(self.requested_classes)
            else:
                if self._num_classes > len(available):
                    raise DatasetFormatError(
                        f"{train_root}: num_classes={self._num_classes} but only "
                        f"{len(available)} class folders exist"
                    )
                self._classes = available[: self._num_classes]
        return self._classes

    def source_train_samples(self) -> list[tuple[Path, int]]:
        """`(path, label)` of the source training images, sorted by class then file name."""
        return list_image_folder(Path(self.data_dir) / "train", self.classes)

    def _protected_root(self, directory: str) -> Path:
        root = Path(directory)
        return root / "train" if (root / "train").is_dir() else root

    @staticmethod
    def _labels(samples: Sequence[tuple[Path, int]]) -> torch.Tensor:
        return torch.tensor([label for _, label in samples], dtype=torch.long)

    @staticmethod
    def _take(samples: list[tuple[Path, int]], idx: torch.Tensor | None) -> list[tuple[Path, int]]:
        """The samples at positions `idx` (all when None)."""
        return samples if idx is None else [samples[i] for i in idx.tolist()]

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Build the file lists (class subset, protected copy, subsets); nothing is decoded."""
        if self._test_samples is None:
            val = list_image_folder(Path(self.data_dir) / "val", self.classes)
            test_idx = self._subset_indices(self._labels(val), self.test_subset)
            self._test_samples = self._take(val, test_idx)
        if stage in (None, "fit") and self._train_samples is None:
            if self.protected_dir is not None:
                self._verify_protected()
                train = list_image_folder(self._protected_root(self.protected_dir), self.classes)
            else:
                train = self.source_train_samples()
            self._train_samples = self._take(train, self._train_subset_indices(self._labels(train)))

    @property
    def train_samples(self) -> list[tuple[Path, int]]:
        """`(path, label)` of the training images in use (after protected swap and subset)."""
        return self._require(self._train_samples, "the training set")

    @property
    def train_labels(self) -> torch.Tensor:
        """Labels of the training images in use, int64 (N,)."""
        return self._labels(self.train_samples)

    @property
    def test_labels(self) -> torch.Tensor:
        """Labels of the validation images in use, int64 (N,)."""
        return self._labels(self._require(self._test_samples, "the test set"))

    # ----------------------------------------------------------------- loaders
    def _file_loader(
        self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False
    ):
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        if self._train_samples is None:
            self.setup("fit")
        size = self.image_size
        transform = train_transform(size) if self.augment else eval_transform(size)
        return self._file_loader(
            ImageFileDataset(self.train_samples, transform),
            self.batch_size,
            True,
            self._drop_last(len(self.train_samples)),
        )

    def val_dataloader(self) -> DataLoader:
        """The clean validation set (reported as test accuracy in the protocol)."""
        if self._test_samples is None:
            self.setup("validate")
        dataset = ImageFileDataset(self._test_samples, eval_transform(self.image_size))
        return self._file_loader(dataset, self.eval_batch_size, False)

    def protect_dataloader(
        self, batch_size: int | None = None, use_subset: bool = False
    ) -> DataLoader:
        """Source training images, resize + center crop (deterministic), in sorted order.

        Yields `(images uint8, labels, index)`, `index` being the position in
        `source_train_samples()` (used by `write_train_set` to name the files).

        Args:
            batch_size: Batch size; `eval_batch_size` when None.
            use_subset: Only the `train_subset` images (same seeded choice) instead of all.
        """
        samples = self.source_train_samples()
        dataset: Dataset = ImageFileDataset(
            samples, eval_transform(self.image_size), return_index=True
        )
        idx = self._subset_indices(self._labels(samples), self.train_subset) if use_subset else None
        if idx is not None:
            dataset = torch.utils.data.Subset(dataset, idx.tolist())
        return self._file_loader(dataset, batch_size or self.eval_batch_size, False)

    # ----------------------------------------------------------------- export
    # One PNG per image: the exporter may write batch by batch instead of holding the whole
    # protected set in memory (an ImageNet subset at 224x224 does not fit).
    streaming_export = True

    def write_train_set(
        self,
        out_dir: str | Path,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor | None = None,
    ) -> list[Path]:
        """Write a PNG tree `out_dir/train/<class>/<original stem>.png`; pass `out_dir` as
        `protected_dir` to train on it.

        Args:
            out_dir: Destination root.
            images_uint8: uint8 images (N, 3, S, S).
            labels: int64 labels (N,), used to check the images are in source order.
            indices: Positions in `source_train_samples()` (the index from `protect_dataloader`);
                None means 0..N-1.

        Returns:
            Paths of the written PNG files.
        """
        from torchvision.io import write_png

        samples = self.source_train_samples()
        labels = torch.as_tensor(labels).reshape(-1).cpu()
        idx = torch.arange(len(images_uint8)) if indices is None else torch.as_tensor(indices)
        idx = idx.reshape(-1).cpu()
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}"
            )
        if not (len(images_uint8) == len(labels) == len(idx)):
            raise ValueError("images, labels and indices must have the same length")
        if len(idx) and (idx.min() < 0 or idx.max() >= len(samples)):
            raise ValueError(f"indices must lie in [0, {len(samples)})")
        classes = self.classes
        root = Path(out_dir) / "train"
        written: list[Path] = []
        for image, label, i in zip(images_uint8.cpu(), labels.tolist(), idx.tolist(), strict=True):
            path, source_label = samples[i]
            if label != source_label:
                raise ValueError(
                    f"label {label} of index {i} does not match {path} ({source_label})"
                )
            target = root / classes[label] / f"{path.stem}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            write_png(image.contiguous(), str(target))
            written.append(target)
        return written

    # ----------------------------------------------------------------- device-side transforms
    def _device_transform(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Apply the attacker filter of the current phase, re-quantised to 8 bits."""
        f = self.train_filter if training else self.test_filter
        if filter_name(f) == "none":
            return x
        f = f.to(x.device)
        with torch.no_grad():
            y = f(x)
        # Round to the 8-bit grid: the attacker saves the filtered images.
        return y.clamp(0, 1).mul(255).round().div(255)
