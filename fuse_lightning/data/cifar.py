"""CIFAR-10 / CIFAR-100 DataModules over the python-version pickles (resident uint8 tensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from fuse_lightning.data.cifar_format import (
    VARIANTS,
    DatasetFormatError,
    cifar_dir,
    expected_counts,
    label_names,
    read_cifar,
    write_cifar,
)
from fuse_lightning.data.resident import ResidentImageDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]


def _existing_paths(data_dir: Path, archive: str, dirname: str) -> set[Path]:
    """Paths a download may create (archive, extracted dir, data_dir and its parents) that exist now."""
    candidates = [data_dir / archive, data_dir / dirname, data_dir, *data_dir.parents]
    return {p for p in candidates if p.exists()}


def _remove_new_paths(data_dir: Path, archive: str, dirname: str, before: set[Path]) -> None:
    """Undo a failed download: delete a partial archive and directories it created (when empty)."""
    import shutil

    archive_path, extracted = data_dir / archive, data_dir / dirname
    if archive_path not in before and archive_path.is_file():
        archive_path.unlink()
    if extracted not in before and extracted.is_dir():
        shutil.rmtree(extracted, ignore_errors=True)
    for directory in [data_dir, *data_dir.parents]:
        if directory in before or not directory.is_dir():
            break
        try:
            directory.rmdir()  # only empty directories go
        except OSError:
            break


class _CIFARDataModule(ResidentImageDataModule):
    """Shared CIFAR logic (the python-version pickles, resident in memory); `variant` selects the
    file layout."""

    variant: str = "cifar10"
    _image_shape = (3, 32, 32)

    @property
    def dataset_dir(self) -> Path:
        """Directory that holds (or will hold) the pickles, e.g. `<data_dir>/cifar-10-batches-py`."""
        return cifar_dir(self.data_dir, self.variant)

    def _files_present(self) -> bool:
        spec = VARIANTS[self.variant]
        names = spec.train_files + spec.test_files + (spec.meta_file,)
        return all((self.dataset_dir / n).is_file() for n in names)

    def _download(self) -> None:
        import torchvision

        spec = VARIANTS[self.variant]
        cls = (
            torchvision.datasets.CIFAR10
            if self.variant == "cifar10"
            else torchvision.datasets.CIFAR100
        )
        before = _existing_paths(Path(self.data_dir), spec.archive, spec.dirname)
        try:
            for train in (True, False):
                cls(self.data_dir, train=train, download=True)
        except Exception as exc:  # no network, bad checksum, read-only directory, ...
            _remove_new_paths(Path(self.data_dir), spec.archive, spec.dirname, before)
            raise DatasetFormatError(
                f"{Path(self.data_dir) / spec.dirname}: {self.variant} is missing and the download "
                f"failed ({type(exc).__name__}: {exc}). Place the contents of the standard "
                f"python-version archive ({spec.archive}) there, or set data.data_dir to the "
                f"directory containing {spec.dirname}/."
            ) from exc

    def prepare_data(self) -> None:
        """Download the archive when `download` is set and the files are missing."""
        if self.download and not self._files_present():
            self._download()

    def _load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.download and not self._files_present():
            self._download()
        images, labels = read_cifar(self.data_dir, self.variant, split)
        expected = expected_counts(self.variant, split)
        if self.check_counts and len(labels) != expected:
            raise DatasetFormatError(
                f"{self.dataset_dir}: the {split} split has {len(labels)} images, expected "
                f"{expected} for the full {self.variant} set; use train_subset / test_subset to "
                f"train on fewer, or protected_dir for a protected copy"
            )
        return images, labels

    def _read_protected(self, directory: str) -> tuple[torch.Tensor, torch.Tensor]:
        return read_cifar(directory, self.variant, "train")

    def write_train_set(
        self,
        out_dir: str | Path,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor | None = None,
    ) -> list[Path]:
        """Write CIFAR pickles under `out_dir/<variant dir>/`; pass `out_dir` as `protected_dir`.

        Args:
            out_dir: Destination root.
            images_uint8: uint8 images (N, 3, 32, 32).
            labels: int64 labels (N,).
            indices: Positions in the source training set, stored in `filenames` as
                `<index>.png`; None means 0..N-1.

        Returns:
            Paths of the written files.
        """
        names = None
        try:
            names = label_names(self.data_dir, self.variant)
        except DatasetFormatError:
            pass  # generic class names when the source meta file is unavailable
        filenames = None
        if indices is not None:
            filenames = [f"{int(i):05d}.png" for i in torch.as_tensor(indices).reshape(-1)]
        return write_cifar(
            out_dir,
            images_uint8,
            labels,
            self.variant,
            "train",
            label_names=names,
            filenames=filenames,
        )


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (10 classes, 50000 train / 10000 test, 32x32) held in memory as uint8.

    Expects `<data_dir>/cifar-10-batches-py/` (python-version archive contents). See
    `ResidentImageDataModule` for the arguments.
    """

    variant = "cifar10"
    _num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (100 fine classes, 50000 train / 10000 test, 32x32) held in memory as uint8.

    Expects `<data_dir>/cifar-100-python/` (python-version archive contents). See
    `ResidentImageDataModule` for the arguments.
    """

    variant = "cifar100"
    _num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
