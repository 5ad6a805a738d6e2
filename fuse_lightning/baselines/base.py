"""Common interface of the baseline perturbation methods.

Every baseline is a `Perturbation`: an optional `fit` on the training set (EM trains a surrogate;
the synthetic methods only draw their class patterns) and a `perturb_fn(images, labels, indices)`
returning the perturbation of a batch. `protect` runs both and exports the protected copy through
`fuse_lightning.protect.protect_dataset`, which enforces the L-infinity budget in uint8.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from fuse_lightning.protect import protect_dataset

__all__ = ["Perturbation", "index_generator", "resolve_device", "seeded_per_index"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`"auto"` / None -> CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def index_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator determined by `(seed, index)` alone.

    Why: per-index seeding makes an image's perturbation independent of batch size, batch order
    and of which other images are protected alongside it.
    """
    if not 0 <= int(index) < 2**32:
        raise ValueError(f"index must lie in [0, 2**32), got {index}")
    return torch.Generator().manual_seed((int(seed) % 2**31) * 2**32 + int(index))


def seeded_per_index(
    seed: int, indices: torch.Tensor, shape: tuple[int, ...], kind: str = "uniform"
) -> torch.Tensor:
    """Stack one seeded draw of `shape` per index: uniform in [0, 1) or standard normal.

    Args:
        seed: Method seed.
        indices: Training-set positions (B,).
        shape: Shape of one draw.
        kind: "uniform" or "normal".

    Returns:
        CPU float32 tensor (B, *shape).
    """
    draw = torch.rand if kind == "uniform" else torch.randn
    rows = [draw(shape, generator=index_generator(seed, int(i))) for i in indices.reshape(-1).tolist()]
    if not rows:
        return torch.empty((0, *shape))
    return torch.stack(rows)


class Perturbation:
    """Base class of the baseline unlearnable-example methods.

    Subclasses store every constructor argument as an attribute of the same name (so `config`
    can record it in the manifest), implement `perturb_fn`, and override `fit` when they need
    the training set.

    Args:
        eps: L-infinity budget of the exported images, in 0-255 units (8 means 8/255).
        seed: Seed of every random draw of the method.
    """

    name: str = "perturbation"

    def __init__(self, eps: float = 8.0, seed: int = 0) -> None:
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = eps
        self.seed = seed
        # Filled by `fit` with what happened (e.g. EM's per-round accuracy); goes to the manifest.
        self.fit_info: dict[str, Any] = {}
        # Where `fit` keeps its resumable state (set by `protect` from `state_path`; None: none).
        self.state_file: Path | None = None

    def config(self) -> dict[str, Any]:
        """Constructor arguments of this instance, read back from its attributes."""
        params = inspect.signature(type(self).__init__).parameters
        return {
            name: getattr(self, name)
            for name, p in params.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def fit(self, datamodule) -> None:
        """Prepare the method on a DataModule's training set (no-op by default)."""

    def state_path(self, out_dir: str | os.PathLike, state_dir: str | os.PathLike | None = None) -> Path | None:
        """File in which `fit` keeps a resumable state for an export to `out_dir`.

        Args:
            out_dir: The export destination.
            state_dir: Directory for the state file (default: beside `out_dir`).

        Returns:
            None: methods whose `fit` is quick keep no state (EM overrides this).
        """
        return None

    def perturb_fn(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """Perturbation of a batch.

        Args:
            images: Clean images, float in [0, 1], (B, C, H, W).
            labels: Class indices (B,).
            indices: Positions of the images in the full training set (B,).

        Returns:
            delta in the [0, 1] scale, same shape and device as `images`.
        """
        raise NotImplementedError

    def manifest(self) -> dict[str, Any]:
        """Manifest entries identifying the method and its arguments."""
        cls = type(self)
        return {
            "method": self.name,
            "method_class": f"{cls.__module__}.{cls.__qualname__}",
            "method_args": self.config(),
            "fit_info": self.fit_info,
        }

    def protect(
        self,
        datamodule,
        out_dir: str | os.PathLike,
        overwrite: bool = False,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        progress: bool = True,
        extra_manifest: dict[str, Any] | None = None,
        state_dir: str | os.PathLike | None = None,
        whole_training_set: bool = False,
    ) -> Path:
        """Fit, then write the protected training set with its manifest.

        A method with a resumable `fit` (see `state_path`) continues from the state a killed
        call with the same destination left behind; the state file is deleted after the export
        unless `keep_state` says otherwise.

        Args:
            datamodule: A project DataModule (e.g. `CIFAR10DataModule`).
            out_dir: Destination directory (must not exist unless `overwrite`).
            overwrite: Replace an existing destination.
            device: Where `perturb_fn` runs during the export ("auto" picks CUDA if available).
            batch_size: Export batch size (default: the DataModule's eval batch size).
            progress: Show progress bars.
            extra_manifest: More manifest entries (e.g. the resolved CLI config).
            state_dir: Directory of the resumable state (default: beside `out_dir`).
            whole_training_set: Export every training image, not only the DataModule's
                `train_subset` the method was fitted on (class-wise patterns fitted on a
                subset protect the whole set; sample-wise EM computes noise for the others).

        Returns:
            The output directory.
        """
        final = Path(out_dir).resolve()
        if final.exists() and not overwrite:  # fail before a possibly long fit
            raise FileExistsError(f"{final} already exists; pass --overwrite to replace it")
        datamodule.setup("fit")
        self.state_file = self.state_path(final, state_dir)
        self.fit(datamodule)
        path = protect_dataset(
            datamodule,
            self.perturb_fn,
            final,
            eps=self.eps,
            manifest={**self.manifest(), **(extra_manifest or {})},
            overwrite=overwrite,
            device=resolve_device(device),
            batch_size=batch_size,
            progress=progress,
            subset_only=not whole_training_set,
        )
        if self.state_file is not None:
            if self.keep_state():
                print(f"[{self.name}] kept {self.state_file}: the fit ran out of rounds before its stop rule; "
                      "rerun with a larger budget (--overwrite) to continue from it")
            else:
                self.state_file.unlink(missing_ok=True)
        return path

    def keep_state(self) -> bool:
        """Whether `protect` keeps the resumable state after the export (default: no).

        Returns:
            True where a rerun with a larger budget should continue the fit (EM overrides this).
        """
        return False

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"
