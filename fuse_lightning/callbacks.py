"""Callbacks of the FUSE run: export the protected set after fit, show what delta looks like, and
send the resolved config to W&B."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
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


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers (none when it logs elsewhere or not at all)."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class ProtectOnFitEnd(L.Callback):
    """After `fit`, write the protected training set (source format + manifest.json).

    Args:
        out_dir: Destination directory (written atomically: temporary directory, then rename).
            None (the default): `<trainer.default_root_dir>/protected`, so the export belongs to
            the run that made it and another run's `overwrite` cannot replace it.
        overwrite: Replace an existing destination instead of failing.
        mode: "samplewise" or "classwise"; default: the module's `mode`.
        enabled: Set false to skip the export (e.g. during quick checks).
        log_artifact: With a W&B logger, log the export as a `protected-dataset` artifact of the
            run (`fuse_lightning.wandb_artifacts.log_protected_set`).
        artifact_name: Its name; default: `<run directory name>-protected`, or the name of
            `out_dir`.
        artifact_aliases: Extra aliases of the artifact (W&B adds `latest`).
        whole_training_set: Export every training image of the source, not only the
            `data.train_subset` the generator trained on (a generator is a function of the
            image: it protects images it never saw).
    """

    def __init__(
        self,
        out_dir: str | None = None,
        overwrite: bool = False,
        mode: Literal["samplewise", "classwise"] | None = None,
        enabled: bool = True,
        log_artifact: bool = True,
        artifact_name: str | None = None,
        artifact_aliases: list[str] | None = None,
        whole_training_set: bool = False,
    ) -> None:
        self.out_dir = out_dir
        self.whole_training_set = whole_training_set
        self.overwrite = overwrite
        self.mode = mode
        self.enabled = enabled
        self.log_artifact = log_artifact
        self.artifact_name = artifact_name
        self.artifact_aliases = list(artifact_aliases or ())

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
                subset_only=not self.whole_training_set,
            )
        finally:
            pl_module.cpu()
        pl_module.print(f"protected training set written to {out}")
        if self.log_artifact:
            self._log_artifact(trainer, out, pl_module)

    def _log_artifact(self, trainer: L.Trainer, out: Path, pl_module: L.LightningModule) -> None:
        """Log the export as an artifact of each W&B run of the trainer (rank 0 only, no collectives)."""
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        from fuse_lightning.wandb_artifacts import default_artifact_name, log_protected_set

        name = self.artifact_name or default_artifact_name(out)
        for logger in loggers:
            try:
                reference = log_protected_set(out, name, run=logger.experiment, aliases=self.artifact_aliases)
            except Exception as exc:  # noqa: BLE001 - the export on disk stands; say why W&B lacks it
                rank_zero_warn(f"protected set {out} was not logged to W&B ({type(exc).__name__}: {exc}); "
                               f"log it later with fuse_lightning.wandb_artifacts.log_protected_set")
                continue
            pl_module.print(f"protected training set logged to W&B as {reference}")


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

    CAPTIONS = {
        "media/grid_clean_delta_protected": "rows: clean | delta (mid-grey = 0, +-eps = white/black) | protected",
        "media/delta_spectrum": "radially averaged power spectrum of delta and of the clean images",
    }

    def _log(self, trainer: L.Trainer, images: dict[str, torch.Tensor]) -> None:
        loggers = wandb_loggers(trainer)
        if loggers:
            # The step Lightning's own metrics use (`trainer/global_step` on the W&B x-axis); with
            # manual optimization `global_step` counts every optimizer step instead.
            step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
            for logger in loggers:  # `log_image` wraps each array in a `wandb.Image`
                for key, tensor in images.items():
                    caption = f"epoch {trainer.current_epoch}: {self.CAPTIONS.get(key, key)}"
                    logger.log_image(key=key, images=[tensor.permute(1, 2, 0).cpu().numpy()], step=step,
                                     caption=[caption])
            return
        # why not `trainer.log_dir`: under DDP it broadcasts from rank 0, and this hook runs on rank 0
        # only, so the other ranks would never answer (a hang, seen with 2 CPU processes).
        root = Path(getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir) / "media"
        root.mkdir(parents=True, exist_ok=True)
        for key, tensor in images.items():
            name = key.split("/")[-1]
            save_image(tensor, root / f"{name}_epoch{trainer.current_epoch:03d}.png")


__all__ = [
    "LoggedSaveConfigCallback",
    "PerturbationMonitor",
    "ProtectOnFitEnd",
    "ThroughputLogger",
    "export_dir",
    "spectrum_figure",
    "wandb_loggers",
]


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Lightning's `SaveConfigCallback` (config.yaml in the log directory), and with a W&B logger
    the resolved config in the run's config and `lightning_config.yaml` in the run's files.

    `wandb` names its own run-config file `config.yaml`, hence the other name. `save_config` runs
    on rank 0 only and makes no collective call (the parent's `setup` does those on every rank).
    """

    RUN_FILE = "lightning_config.yaml"

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        try:
            text = self.parser.dump(self.config, skip_none=False)
            config = yaml.safe_load(text)
        except Exception as exc:  # noqa: BLE001 - an undumpable value must not stop training
            rank_zero_warn(f"the resolved config was not sent to W&B ({type(exc).__name__}: {exc})")
            return
        for logger in loggers:
            logger.log_hyperparams(config)
            run = logger.experiment
            run_dir = getattr(run, "dir", None)
            if not run_dir:  # a disabled run has no files directory
                continue
            path = Path(run_dir) / self.RUN_FILE
            path.write_text(text)
            run.save(str(path), base_path=str(run_dir), policy="now")


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


class ResultWriter(L.Callback):
    """Write the run's accuracies to `result.json` when fit ends (atomically: temporary file, rename).

    Read from `trainer.callback_metrics`, so any logger (CSV, W&B, none) works. The file holds
    `val_acc` (the monitored metric at the final validation: the number an attacker gets, who
    cannot early-stop on test data), `best_val_acc` (its maximum over validations), `train_acc`
    (last value), `epochs` (validations seen), `num_classes` (the model's hyper-parameter) and
    `metrics` (every scalar in `callback_metrics` at the end). The values seen survive a resume
    from a checkpoint.

    Args:
        path: Destination; default `<trainer.default_root_dir>/result.json`.
        monitor: The accuracy to report.
        train_metric: The training accuracy to report.
    """

    def __init__(self, path: str | None = None, monitor: str = "val/acc", train_metric: str = "train/acc") -> None:
        self.path = path
        self.monitor = monitor
        self.train_metric = train_metric
        self.values: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if not trainer.sanity_checking and value is not None:
            self.values.append(float(value))

    def state_dict(self) -> dict[str, list[float]]:
        return {"values": list(self.values)}

    def load_state_dict(self, state_dict: dict[str, list[float]]) -> None:
        self.values = list(state_dict.get("values", []))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import json

        from fuse_lightning.results import atomic_write_text

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        result = {
            "val_acc": self.values[-1] if self.values else None,
            "best_val_acc": max(self.values) if self.values else None,
            "train_acc": metrics.get(self.train_metric),
            "epochs": len(self.values),
            "num_classes": getattr(pl_module, "hparams", {}).get("num_classes"),
            "metrics": metrics,
        }
        path = Path(self.path) if self.path else Path(trainer.default_root_dir) / "result.json"
        atomic_write_text(path, json.dumps(result, indent=2))
