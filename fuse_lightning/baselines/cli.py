"""`fuse baseline`: fit a baseline method and export the protected training set.

    fuse baseline --config configs/baselines/em_cifar10.yaml --out outputs/protected/em_cifar10
    fuse baseline --config configs/baselines/ar_cifar10.yaml --data.init_args.data_dir ../shared/data \\
        --method.init_args.seed 1 --out outputs/protected/ar_seed1 --overwrite

Configs compose (`--config a.yaml --config b.yaml`, the last wins) and every argument can be
overridden with a dotted flag. `data` is any LightningDataModule of the project and `method` any
`Perturbation` (class_path + init_args).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

# Imported so that short class names (`CIFAR10DataModule`, `LowPass`, `RandomNoise`) resolve.
import fuse_lightning.baselines  # noqa: F401
import fuse_lightning.data  # noqa: F401
import fuse_lightning.filters  # noqa: F401
from fuse_lightning.baselines.base import Perturbation

__all__ = ["baseline_main", "build_parser"]


def build_parser() -> ArgumentParser:
    """The argument parser of `fuse baseline`."""
    parser = ArgumentParser(
        prog="fuse baseline",
        description="Fit a baseline unlearnable-example method and export the protected training set.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (repeatable).")
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    parser.add_subclass_arguments(Perturbation, "method", required=True)
    parser.add_argument("--out", type=str, required=True, help="Output directory of the protected set.")
    parser.add_argument(
        "--overwrite", action=ActionYesNo, default=False, help="Replace an existing output directory."
    )
    parser.add_argument(
        "--device", type=str | None, default=None,
        help="Device of the method (fit and export): cpu, cuda, auto. Default: the method's own "
        "`device` setting where it has one, else auto.",
    )
    parser.add_argument(
        "--batch_size", type=int | None, default=None,
        help="Export batch size (default: the DataModule's eval batch size).",
    )
    parser.add_argument(
        "--state_dir", type=str | None, default=None,
        help="Where a resumable method (EM) keeps its state after each round; rerunning the same "
        "command after a kill continues from there. Default: beside --out (<out>.em-state.pt).",
    )
    parser.add_argument(
        "--whole_training_set", action=ActionYesNo, default=False,
        help="Export every training image, not only the data's train_subset the method was "
        "fitted on (e.g. class-wise EM fitted on 20 %% of CIFAR-10 protects all 50 000).",
    )
    parser.add_argument(
        "--progress", action=ActionYesNo, default=True,
        help="Show progress bars (--no_progress also silences the method's own bars).",
    )
    parser.add_argument(
        "--wandb_project", type=str | None, default=None,
        help="Also log the export as a W&B artifact (type protected-dataset) in this project.",
    )
    parser.add_argument(
        "--wandb_artifact", type=str | None, default=None,
        help="Name of that artifact (default: the --out directory's name).",
    )
    return parser


def _config_dict(parser: ArgumentParser, cfg) -> dict[str, Any]:
    """The resolved config as plain data for the manifest."""
    try:
        return yaml.safe_load(parser.dump(cfg, skip_none=False))
    except Exception:  # an object that cannot be dumped must not fail the export
        return {}


def baseline_main(argv: list[str]) -> int:
    """Run `fuse baseline`; returns the exit status (argument errors exit with status 2)."""
    parser = build_parser()
    cfg = parser.parse_args(list(argv))
    out = Path(cfg.out).resolve()
    if out.exists() and not cfg.overwrite:
        print(f"fuse baseline: error: {out} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    config = _config_dict(parser, cfg)
    init = parser.instantiate_classes(cfg)
    method: Perturbation = init.method
    datamodule = init.data
    if cfg.device is not None and hasattr(method, "device"):
        method.device = cfg.device  # one flag moves the whole method (e.g. EM's surrogate)
    if not cfg.progress and hasattr(method, "progress"):
        method.progress = False
    try:
        path = method.protect(
            datamodule,
            out,
            overwrite=cfg.overwrite,
            device=cfg.device or "auto",
            batch_size=cfg.batch_size,
            progress=cfg.progress,
            extra_manifest={"config": config},
            state_dir=cfg.state_dir,
            whole_training_set=cfg.whole_training_set,
        )
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"fuse baseline: error: {exc}", file=sys.stderr)
        return 1
    print(f"fuse baseline: wrote {method.name} protected training set to {path}")
    if cfg.wandb_project:
        from fuse_lightning.wandb_artifacts import log_export

        log_export(path, cfg.wandb_project, cfg.wandb_artifact, "fuse baseline")
    return 0
