"""Reading and writing the CIFAR-10 / CIFAR-100 "python version" pickle layout.

Pure I/O (numpy + torch, no Lightning). The reader validates structure instead of md5 sums so
that protected copies written by `write_cifar` (which have other checksums, and may be subsets)
load through the same path as the original archives.

Layout (the contents of the official `cifar-10-python.tar.gz` / `cifar-100-python.tar.gz`):

    cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/     train, test, meta
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DatasetFormatError",
    "VARIANTS",
    "cifar_dir",
    "expected_counts",
    "label_names",
    "read_cifar",
    "restricted_load",
    "write_cifar",
]

IMAGE_SHAPE = (3, 32, 32)
ROW_SIZE = 3 * 32 * 32


class DatasetFormatError(ValueError):
    """A dataset file or directory is missing or does not have the expected format."""


@dataclass(frozen=True)
class CifarVariant:
    """File names and pickle keys of one CIFAR variant."""

    dirname: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    meta_file: str
    names_key: str
    num_classes: int


VARIANTS: dict[str, CifarVariant] = {
    "cifar10": CifarVariant(
        dirname="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        meta_file="batches.meta",
        names_key="label_names",
        num_classes=10,
    ),
    "cifar100": CifarVariant(
        dirname="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        meta_file="meta",
        names_key="fine_label_names",
        num_classes=100,
    ),
}

_COUNTS = {"train": 50000, "test": 10000}


def _variant(variant: str) -> CifarVariant:
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(
            f"unknown CIFAR variant {variant!r}; expected one of {sorted(VARIANTS)}"
        ) from None


def _split_files(spec: CifarVariant, split: str) -> tuple[str, ...]:
    if split == "train":
        return spec.train_files
    if split == "test":
        return spec.test_files
    raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")


def expected_counts(variant: str, split: str) -> int:
    """Number of images in the full official split (50000 train / 10000 test for both variants)."""
    _variant(variant)
    if split not in _COUNTS:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    return _COUNTS[split]


def cifar_dir(root: str | Path, variant: str) -> Path:
    """The directory holding the pickles: `root/<variant dir>`, or `root` itself if it is one.

    `root` is normally the parent (torchvision's convention); a path that already is the variant
    directory (named like it, or holding its meta file without a nested variant directory) is
    accepted as well.
    """
    spec = _variant(variant)
    root = Path(root)
    nested = root / spec.dirname
    if nested.is_dir():
        return nested
    if root.name == spec.dirname or (root / spec.meta_file).is_file():
        return root
    return nested


def _missing_message(path: Path, spec: CifarVariant) -> str:
    return (
        f"{path}: file not found. Expected the CIFAR python-version layout: extract "
        f"{spec.archive} so that its files ({', '.join(spec.train_files + spec.test_files)}, "
        f"{spec.meta_file}) lie in {path.parent}, or point data.data_dir at the directory "
        f"containing {spec.dirname}/."
    )


class RefusedPickleError(pickle.UnpicklingError):
    """A pickle asks for something outside the CIFAR allow-list (a global, an object array)."""


# Numeric dtype kinds a CIFAR array may have: bool, signed/unsigned int, float, complex.
NUMERIC_KINDS = frozenset("biufc")


def _numeric_dtype(*args: Any) -> np.dtype:
    """`numpy.dtype(...)` as called by pickled arrays, refusing object/str/structured dtypes."""
    dtype = np.dtype(*args)
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None:
        raise RefusedPickleError(f"numpy dtype {dtype!s} is not numeric")
    return dtype


def _plain_ndarray_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's `_reconstruct`, limited to plain `numpy.ndarray` (no subclasses)."""
    if subtype is not np.ndarray:
        raise RefusedPickleError(f"array subtype {subtype!r} is not numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, shape, _numeric_dtype(dtype))


def _numeric_frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's protocol-5 array reader, limited to numeric dtypes."""
    array = np.frombuffer(buf, dtype=_numeric_dtype(dtype))
    return array.reshape(shape, order="F" if order == "F" else "C")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode`, as protocol-2 pickles of python-3 bytes use it; latin1 only."""
    if str(encoding).lower().replace("-", "") not in ("latin1", "iso88591"):
        raise RefusedPickleError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return str(text).encode("latin1")


# The only globals a CIFAR pickle may name (numpy 1.x and 2.x spellings). Everything else is
# refused before it is looked up, so a crafted file cannot run code.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numeric_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _plain_ndarray_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _plain_ndarray_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numeric_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric_frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that builds only dicts, lists, tuples, str/bytes, numbers and numeric arrays."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedPickleError(
                f"refusing to load global {module}.{name}: a CIFAR file holds only dicts, lists, "
                f"strings and numeric numpy arrays"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickleError("persistent ids are not allowed in a CIFAR file")


def restricted_load(fh: Any) -> Any:
    """Unpickle a CIFAR file object without importing or calling anything outside the allow-list.

    Args:
        fh: A binary file object.

    Returns:
        The unpickled object (bytes keys stay bytes: encoding="bytes" reads python-2 originals).

    Raises:
        RefusedPickleError: The pickle names a global outside the allow-list, or a numpy
            array of a non-numeric dtype.
    """
    return _CifarUnpickler(fh, encoding="bytes").load()


def _load_pickle(path: Path, spec: CifarVariant) -> dict[str, Any]:
    """Unpickle one CIFAR file (restricted) and return it with str keys (originals use bytes)."""
    if not path.is_file():
        raise DatasetFormatError(_missing_message(path, spec))
    try:
        with path.open("rb") as fh:
            obj = restricted_load(fh)
    except RefusedPickleError as exc:
        raise DatasetFormatError(
            f"{path}: not a plain CIFAR pickle ({exc}); refusing to load it. Re-extract "
            f"{spec.archive} or re-export the protected set"
        ) from None
    except Exception as exc:  # truncated files raise EOFError, garbage ValueError, ...
        raise DatasetFormatError(
            f"{path}: could not unpickle ({type(exc).__name__}: {exc}); the file is truncated or "
            f"corrupt, re-extract {spec.archive}"
        ) from None
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _get(entry: dict[str, Any], key: str, path: Path) -> Any:
    if key not in entry:
        raise DatasetFormatError(f"{path}: missing key {key!r} (found keys {sorted(entry)})")
    return entry[key]


def _read_file(path: Path, spec: CifarVariant) -> tuple[np.ndarray, np.ndarray]:
    entry = _load_pickle(path, spec)
    data = _get(entry, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = getattr(data, "dtype", type(data).__name__)
        raise DatasetFormatError(f"{path}: 'data' must be a uint8 numpy array, got {kind}")
    if data.ndim != 2 or data.shape[1] != ROW_SIZE:
        raise DatasetFormatError(
            f"{path}: 'data' must have shape (n, {ROW_SIZE}) (3x32x32 channel-major rows), "
            f"got {tuple(data.shape)}"
        )
    raw = _get(entry, spec.label_key, path)
    try:
        labels = np.asarray(raw, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetFormatError(f"{path}: {spec.label_key!r} must be a list of ints") from exc
    if labels.ndim != 1 or len(labels) != len(data):
        raise DatasetFormatError(
            f"{path}: {spec.label_key!r} must be a flat list with one label per row of 'data' "
            f"({len(data)}), got shape {tuple(labels.shape)}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DatasetFormatError(
            f"{path}: labels must lie in [0, {spec.num_classes}), got range "
            f"[{labels.min()}, {labels.max()}]"
        )
    return data, labels


def read_cifar(root: str | Path, variant: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split of CIFAR-10/100 from the python-version pickles.

    Args:
        root: Directory containing the variant directory (`cifar-10-batches-py` or
            `cifar-100-python`), or that directory itself.
        variant: "cifar10" or "cifar100".
        split: "train" or "test".

    Returns:
        Images as uint8 (N, 3, 32, 32) and labels as int64 (N,). Counts are not checked here
        (protected copies may be subsets); compare with `expected_counts` for full sets.

    Raises:
        DatasetFormatError: A file is missing, truncated, or holds wrongly typed data.
    """
    spec = _variant(variant)
    directory = cifar_dir(root, variant)
    parts = [_read_file(directory / name, spec) for name in _split_files(spec, split)]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, *IMAGE_SHAPE)
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels)


def label_names(root: str | Path, variant: str) -> list[str]:
    """Class names from the meta file (`batches.meta` / `meta`), as str."""
    spec = _variant(variant)
    path = cifar_dir(root, variant) / spec.meta_file
    names = _get(_load_pickle(path, spec), spec.names_key, path)
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _as_numpy(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def write_cifar(
    out_dir: str | Path,
    images_uint8: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    variant: str,
    split: str = "train",
    label_names: Sequence[str] | None = None,
    filenames: Sequence[str] | None = None,
) -> list[Path]:
    """Write images in the CIFAR python-version layout, loadable by `read_cifar` and torchvision.

    Files go to `out_dir/<variant dir>/` (or straight into `out_dir` when it is named like the
    variant directory), so `out_dir` can be passed as `root` / `data_dir` afterwards. Keys are
    str (torchvision reads with encoding="latin1" and indexes `entry["data"]`, `entry["labels"]`).
    CIFAR-10 training data is split over `data_batch_1..5` as evenly as possible; the meta file
    is always (re)written.

    Args:
        out_dir: Destination root.
        images_uint8: uint8 images (N, 3, 32, 32).
        labels: Class indices (N,).
        variant: "cifar10" or "cifar100".
        split: "train" or "test".
        label_names: Class names for the meta file; `class_<i>` when None.
        filenames: Per-image names stored under `filenames`; `<index>.png` when None.

    Returns:
        Paths of the written files (data files first, then the meta file).
    """
    spec = _variant(variant)
    files = _split_files(spec, split)
    images = _as_numpy(images_uint8, None)
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(
            f"images must be uint8 of shape (N, 3, 32, 32), got {images.dtype} {images.shape}"
        )
    targets = _as_numpy(labels, np.int64).reshape(-1)
    if len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} labels")
    if len(targets) and (targets.min() < 0 or targets.max() >= spec.num_classes):
        raise ValueError(f"labels must lie in [0, {spec.num_classes})")
    names = (
        list(label_names)
        if label_names is not None
        else [f"class_{i}" for i in range(spec.num_classes)]
    )
    if len(names) != spec.num_classes:
        raise ValueError(f"expected {spec.num_classes} label names, got {len(names)}")
    stems = (
        list(filenames) if filenames is not None else [f"{i:05d}.png" for i in range(len(images))]
    )

    directory = Path(out_dir)
    if directory.name != spec.dirname:
        directory = directory / spec.dirname
    directory.mkdir(parents=True, exist_ok=True)
    rows = images.reshape(len(images), ROW_SIZE)
    written: list[Path] = []
    for i, chunk in enumerate(np.array_split(np.arange(len(images)), len(files))):
        kind = "training" if split == "train" else "testing"
        entry: dict[str, Any] = {
            "batch_label": f"{kind} batch {i + 1} of {len(files)}",
            spec.label_key: [int(t) for t in targets[chunk]],
            "data": np.ascontiguousarray(rows[chunk]),
            "filenames": [stems[j] for j in chunk],
        }
        if variant == "cifar100":
            entry["coarse_labels"] = [0] * len(chunk)  # superclasses are not tracked
        written.append(_dump(directory / files[i], entry))
    if variant == "cifar10":
        meta: dict[str, Any] = {
            "num_cases_per_batch": max(1, -(-len(images) // len(files))),
            "label_names": names,
            "num_vis": ROW_SIZE,
        }
    else:
        meta = {
            "fine_label_names": names,
            "coarse_label_names": [f"superclass_{i}" for i in range(20)],
        }
    written.append(_dump(directory / spec.meta_file, meta))
    return written


def _dump(path: Path, obj: dict[str, Any]) -> Path:
    # Write to a temporary name first so an interrupted export never leaves a truncated pickle.
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    return path
