"""Datasets as LightningDataModules: CIFAR-10/100 resident in memory, ImageNet subsets from files.

`ImageClassificationDataModule` is the shared base; `ResidentImageDataModule` (CIFAR) and
`ImageNetSubsetDataModule` are its two ways of loading data.
"""

from fuse_lightning.data.base import (
    ImageClassificationDataModule,
    TensorBatchDataset,
    random_crop_flip,
    random_resized_crop_flip,
    stratified_subset_indices,
)
from fuse_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from fuse_lightning.data.cifar_format import (
    DatasetFormatError,
    expected_counts,
    label_names,
    read_cifar,
    write_cifar,
)
from fuse_lightning.data.imagenet import ImageNetSubsetDataModule
from fuse_lightning.data.resident import ResidentImageDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DatasetFormatError",
    "ImageClassificationDataModule",
    "ImageNetSubsetDataModule",
    "ResidentImageDataModule",
    "TensorBatchDataset",
    "expected_counts",
    "label_names",
    "random_crop_flip",
    "random_resized_crop_flip",
    "read_cifar",
    "stratified_subset_indices",
    "write_cifar",
]
