"""Callbacks of the FUSE run: export the protected set after fit, and show what delta looks like."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from fuse_lightning import spectral


def export_dir(out_dir: str | Path | None, default_root_dir: str | Path) -> Path:
    """Where `ProtectOnFitEnd` writes: `out_dir`, or the run's own `<default_root_dir>/protected`.

    Args:
        out_dir: Explicit destination, or None.
        default_root_dir: The trainer's `default_root_dir` (differs between runs, same on resume).

    Returns:
        The destination directory.
    """
    return Path(out_dir) if out_dir is not None else Path(default_root_dir) / "protected"


class ProtectOnFitEnd(L.Callback):
    """After `fit`, write the protected training set (source format + manifest.json).

    Args:
        out_dir: Destination directory (written atomically: temporary directory, then rename).
            None (the default): `<trainer.default_root_dir>/protected`, so the export belongs to
            the run that made it and another run's `overwrite` cannot replace it.
        overwrite: Replace an existing destination instead of failing.
        mode: "samplewise" or "classwise"; default: the module's `mode`.
        enabled: Set false to skip the export (e.g. during quick checks).
    """

    def __init__(self, out_dir: str | None = None, overwrite: bool = False,
                 mode: Literal["samplewise", "classwise"] | None = None, enabled: bool = True) -> None:
        self.out_dir = out_dir
        self.overwrite = overwrite
        self.mode = mode
        self.enabled = enabled

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        from fuse_lightning.protect import protect_dataset, run_manifest

        datamodule = trainer.datamodule
        # why: `on_fit_end` runs after the strategy's teardown, which has moved the module back
        # to the CPU; export on the training device (measured on an H200: 1 000 img/s on the
        # CPU after teardown vs 30 000 img/s on the GPU).
        device = trainer.strategy.root_device
        pl_module.to(device)
        try:
            perturb = pl_module.make_perturb_fn(datamodule, self.mode)
            out = protect_dataset(
                datamodule,
                perturb,
                export_dir(self.out_dir, trainer.default_root_dir),
                eps=pl_module.hparams.eps,
                manifest=run_manifest(pl_module, datamodule, mode=self.mode or pl_module.hparams.mode, trainer=trainer),
                overwrite=self.overwrite,
                device=device,
            )
        finally:
            pl_module.cpu()
        pl_module.print(f"protected training set written to {out}")


def _figure_to_tensor(fig) -> torch.Tensor:
    import matplotlib.pyplot as plt
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    return pil_to_tensor(Image.open(buffer).convert("RGB")).float() / 255


def spectrum_figure(delta: torch.Tensor, clean: torch.Tensor, title: str = ""):
    """Radially averaged power spectrum of delta (and of the clean images, for scale), log-y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for tensor, label in ((clean, "clean images"), (delta, "delta")):
        radii, power = spectral.radial_power_spectrum(tensor.float())
        ax.semilogy(radii.cpu(), power.cpu().clamp(min=1e-12), label=label)
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("normalized radius (1 = Nyquist)")
    ax.set_ylabel("power")
    ax.set_title(title or "radially averaged power spectrum")
    ax.legend()
    return fig


class PerturbationMonitor(L.Callback):
    """Logs image grids (clean | delta amplified | protected) and delta's power spectrum.

    With a W&B logger the images go to the dashboard; otherwise PNGs are written under
    `<log_dir>/media/`.

    Args:
        every_n_epochs: Log at the end of every n-th training epoch (and after the last one).
        num_images: Images per grid row.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images

    @torch.no_grad()
    def _images(self, trainer: L.Trainer, pl_module: L.LightningModule):
        batch = next(iter(trainer.datamodule.protect_dataloader(batch_size=max(self.num_images, 64))))
        images, labels = batch[0].to(pl_module.device).float() / 255, batch[1].to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        delta = pl_module.perturbation(images, labels)
        pl_module.train(was_training)
        return images, delta

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        if trainer.sanity_checking or not ((trainer.current_epoch + 1) % self.every_n_epochs == 0 or last):
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "protect_dataloader"):
            return
        images, delta = self._images(trainer, pl_module)
        n = self.num_images
        eps = pl_module.eps_unit
        amplified = (delta[:n] / (2 * eps) + 0.5).clamp(0, 1)  # [-eps, eps] -> [0, 1]
        rows = torch.cat([images[:n], amplified, (images[:n] + delta[:n]).clamp(0, 1)])
        if rows.shape[-1] < 128:  # small images (CIFAR): enlarge so the grid is readable
            rows = torch.nn.functional.interpolate(rows, scale_factor=128 // rows.shape[-1], mode="nearest")
        grid = make_grid(rows, nrow=n, padding=2, pad_value=1.0)
        spectrum = _figure_to_tensor(spectrum_figure(delta, images, f"epoch {trainer.current_epoch}"))
        self._log(trainer, {"media/grid_clean_delta_protected": grid, "media/delta_spectrum": spectrum})

    def _log(self, trainer: L.Trainer, images: dict[str, torch.Tensor]) -> None:
        logger = trainer.logger
        if logger is not None and type(logger).__name__ == "WandbLogger":
            for key, tensor in images.items():
                logger.log_image(key=key, images=[tensor.permute(1, 2, 0).cpu().numpy()], step=trainer.global_step)
            return
        # why not `trainer.log_dir`: under DDP it broadcasts from rank 0, and this hook runs on rank 0
        # only, so the other ranks would never answer (a hang, seen with 2 CPU processes).
        root = Path(getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir) / "media"
        root.mkdir(parents=True, exist_ok=True)
        for key, tensor in images.items():
            name = key.split("/")[-1]
            save_image(tensor, root / f"{name}_epoch{trainer.current_epoch:03d}.png")


__all__ = ["PerturbationMonitor", "ProtectOnFitEnd", "export_dir", "spectrum_figure"]


class ThroughputLogger(L.Callback):
    """Log training throughput: `perf/train_img_per_s` and `perf/epoch_seconds` each epoch.

    Time runs from the first training batch of the epoch to its end (validation excluded), with
    the device synchronised at both ends so asynchronous GPU work is counted where it happens.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._images = 0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._images = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._start is None:
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._images += int(batch[0].shape[0]) * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None or self._images == 0:
            return
        self._sync(pl_module)
        seconds = time.perf_counter() - self._start
        pl_module.log("perf/epoch_seconds", seconds, sync_dist=False)
        pl_module.log("perf/train_img_per_s", self._images / max(seconds, 1e-9), sync_dist=False)
