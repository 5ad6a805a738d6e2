"""Write a protected copy of a training set: perturb, quantize to uint8 within budget, export.

Every method of the project (FUSE and the baselines) reduces to a *perturbation function*
`delta = perturb_fn(images, labels, indices)` on float images in [0, 1]. `protect_dataset` turns it
into a protected dataset in the source's own on-disk format (CIFAR pickle batches, or a PNG tree for
ImageNet subsets) plus a `manifest.json`, guaranteeing ‖x_protected − x‖∞ ≤ ε in uint8 units.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place only
when complete, so an interrupted export never leaves a half-written dataset behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from tqdm.auto import tqdm

import fuse_lightning
from fuse_lightning.budget import linf_uint8, quantize_protected
from fuse_lightning.images import output_name, perturb_tiled, read_image
from fuse_lightning.manifest import ManifestError, sha256_file, verify_manifest, write_manifest  # noqa: F401

PerturbFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def code_version() -> str:
    """Package version plus the git commit when run from a checkout (`+dirty` if modified)."""
    version = fuse_lightning.__version__
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{version}+g{commit}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return version


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def stale_temp_dirs(final: Path) -> list[Path]:
    """Hidden siblings `.<name>.tmp-<pid>-*` / `.<name>.old-<pid>` left by exports that died.

    Only directories whose writer process no longer exists are returned, so a concurrent export
    to the same destination is left alone.
    """
    stale = []
    for kind in ("tmp", "old"):
        for path in final.parent.glob(f".{final.name}.{kind}-*"):
            pid_text = path.name[len(f".{final.name}.{kind}-"):].split("-", 1)[0]
            if path.is_dir() and (not pid_text.isdigit() or not _pid_alive(int(pid_text))):
                stale.append(path)
    return sorted(stale)


def prepare_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> tuple[Path, Path]:
    """Check the destination and make a temporary sibling to write into.

    Temporary directories left behind by a killed export to the same destination are removed
    first. The temporary directory gets the umask's permissions (not mkdtemp's 0700), so the
    export is as readable as any directory the user creates.

    Args:
        out_dir: The final destination.
        overwrite: Allow replacing an existing destination.

    Returns:
        (final path, temporary path).

    Raises:
        FileExistsError: The destination exists and `overwrite` is false.
    """
    final = Path(out_dir).resolve()
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temp_dirs(final):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    tmp.chmod(0o777 & ~current_umask())
    return final, tmp


def commit_output_dir(tmp: Path, final: Path) -> None:
    """Atomically move a completed temporary directory into place (replacing an old one)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[tuple[Path, Path]]:
    """`with atomic_output_dir(out, overwrite) as (final, tmp):` write into `tmp`; on success it
    replaces `final` in one rename, on any error (or Ctrl-C) it is removed and `final` is untouched."""
    final, tmp = prepare_output_dir(out_dir, overwrite)
    try:
        yield final, tmp
        commit_output_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class FidelityMeter:
    """Accumulates PSNR, SSIM (torchmetrics) and the uint8 L∞ distance of protected vs clean."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        # sync_on_compute=False: an export runs in one process (rank 0 under DDP); a cross-process
        # sync there would wait forever for the other ranks.
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False).to(device)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False).to(device)
        self.linf = 0
        self.count = 0

    def update(self, clean_uint8: torch.Tensor, protected_uint8: torch.Tensor) -> None:
        clean = clean_uint8.float() / 255
        protected = protected_uint8.float() / 255
        self.psnr.update(protected, clean)
        if min(clean.shape[-2:]) >= 11:  # SSIM's 11x11 Gaussian window needs at least that size
            self.ssim.update(protected, clean)
        self.linf = max(self.linf, linf_uint8(clean_uint8, protected_uint8))
        self.count += clean.shape[0]

    def compute(self) -> dict[str, float]:
        result = {"psnr": float(self.psnr.compute()), "linf_uint8": int(self.linf), "num_images": self.count}
        try:
            result["ssim"] = float(self.ssim.compute())
        except (RuntimeError, ValueError):  # no update (tiny images)
            result["ssim"] = float("nan")
        return result


@torch.no_grad()
def protect_dataset(
    datamodule,
    perturb_fn: PerturbFn,
    out_dir: str | os.PathLike,
    eps: float,
    manifest: dict[str, Any] | None = None,
    overwrite: bool = False,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    progress: bool = True,
    subset_only: bool = True,
) -> Path:
    """Perturb a DataModule's whole training set and export it in the source's format.

    Args:
        datamodule: A project DataModule (CIFAR or ImageNet subset); `setup("fit")` is called.
        perturb_fn: `(images in [0,1], labels, indices) -> delta` on `device`; any range,
            clipped to the budget here.
        out_dir: Destination directory (must not exist unless `overwrite`).
        eps: Budget in 0-255 units (8 means 8/255).
        manifest: Extra manifest entries (method, config, seed...).
        overwrite: Replace an existing destination.
        device: Where `perturb_fn` runs.
        batch_size: Protection batch size (default: the DataModule's eval batch size).
        progress: Show a progress bar.
        subset_only: Export only the DataModule's `train_subset` (when set), the images a
            method was fitted on; false exports every training image of the source.

    Returns:
        The final output directory.
    """
    with atomic_output_dir(out_dir, overwrite) as (final, tmp):
        datamodule.setup("fit")
        # The training set the run was configured with (its `train_subset`, if any), clean.
        loader = datamodule.protect_dataloader(batch_size=batch_size, use_subset=subset_only)
        meter = FidelityMeter(device)
        # Formats with one file per image (PNG trees) are written batch by batch; pickled
        # batches (CIFAR) need the whole set, which is small.
        streaming = bool(getattr(datamodule, "streaming_export", False))
        protected_batches, label_batches, index_batches = [], [], []
        num_images = 0
        start = time.perf_counter()
        for images, labels, indices in tqdm(loader, desc=f"protect -> {final.name}", disable=not progress):
            images, labels = images.to(device), labels.to(device)
            delta = perturb_fn(images.float() / 255, labels, indices.to(device))
            protected = quantize_protected(images, delta, eps)
            meter.update(images, protected)
            num_images += len(labels)
            if streaming:
                datamodule.write_train_set(tmp, protected.cpu(), labels.cpu(), indices=indices.cpu())
                continue
            protected_batches.append(protected.cpu())
            label_batches.append(labels.cpu())
            index_batches.append(indices.cpu())
        if not streaming:
            indices_all = torch.cat(index_batches)
            order = indices_all.argsort()
            datamodule.write_train_set(
                tmp, torch.cat(protected_batches)[order], torch.cat(label_batches)[order], indices=indices_all[order]
            )
        fidelity = meter.compute()
        seconds = time.perf_counter() - start  # perturb + quantize + write, without start-up
        info = {
            "format": type(datamodule).__name__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": code_version(),
            "eps_255": eps,
            "num_images": num_images,
            "protect_seconds": round(seconds, 3),
            "protect_img_per_s": round(num_images / max(seconds, 1e-9), 1),
            "fidelity": fidelity,
            **(manifest or {}),
        }
        write_manifest(tmp, info)
        if fidelity["linf_uint8"] > eps:  # cannot happen after quantize_protected; guard anyway
            raise AssertionError(f"budget violated: {fidelity['linf_uint8']} > {eps}")
    return final


def run_manifest(pl_module, datamodule, mode: str, trainer=None, ckpt_path: str | None = None) -> dict[str, Any]:
    """Manifest entries of a FUSE export: method, every model/data setting, seed, provenance."""
    data_hparams = dict(getattr(datamodule, "hparams", {}) or {})
    info: dict[str, Any] = {
        "method": "fuse",
        "mode": mode,
        "model_class": type(pl_module).__name__,
        "model_config": {k: v for k, v in dict(pl_module.hparams).items()},
        "data_class": type(datamodule).__name__,
        "data_config": {k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple, dict)) else repr(v)) for k, v in data_hparams.items()},
        "seed": os.environ.get("PL_GLOBAL_SEED"),
        "checkpoint": ckpt_path,
    }
    if trainer is not None:
        info["global_step"] = int(trainer.global_step)
        info["epochs"] = int(trainer.current_epoch)
        # The logger's own directory: `trainer.log_dir` is a collective under DDP, and exports run
        # on rank 0 only.
        log_dir = getattr(trainer.logger, "log_dir", None)
        config_file = Path(log_dir or "") / "config.yaml"
        if log_dir and config_file.is_file():
            info["cli_config"] = config_file.read_text()
    return info


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def image_fidelity(clean: torch.Tensor, protected: torch.Tensor, ssim_max_side: int) -> dict[str, float]:
    """PSNR and uint8 L-inf of one image; SSIM only when both sides are <= `ssim_max_side`.

    Args:
        clean: uint8 (1, 3, H, W).
        protected: uint8 (1, 3, H, W).
        ssim_max_side: Largest side SSIM is computed for (its memory grows with the image).
    """
    if max(clean.shape[-2:]) <= ssim_max_side:
        meter = FidelityMeter(clean.device)
        meter.update(clean, protected)
        return meter.compute()
    diff = clean.int() - protected.int()
    mse = float(diff.double().pow(2).mean()) / 255**2
    psnr = float("inf") if mse == 0 else float(10 * torch.log10(torch.tensor(1.0 / mse)))
    return {"psnr": psnr, "linf_uint8": int(diff.abs().max()), "num_images": 1, "ssim": float("nan")}


def _protect_image(
    pl_module, path: Path, rel: Path, cls: int, tmp: Path, eps: float, tile: int, overlap: int
) -> tuple[str, dict[str, Any]]:
    """Perturb one image file as class `cls`, write `<tmp>/<output name>`; (output name, manifest entry)."""
    rgb, alpha, mode = read_image(path)
    clean = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(pl_module.device)
    y = torch.tensor([cls], device=pl_module.device)
    delta = perturb_tiled(lambda crop: pl_module.perturbation(crop, y), clean.float() / 255, tile, overlap)
    protected = quantize_protected(clean, delta, eps)
    del delta
    out_rel = output_name(rel.as_posix())
    target = tmp / out_rel
    target.parent.mkdir(parents=True, exist_ok=True)
    pixels = protected[0].permute(1, 2, 0).cpu().numpy()
    if alpha is not None:
        pixels = np.concatenate([pixels, alpha[..., None]], axis=2)
    Image.fromarray(pixels).save(target)
    entry = {
        "source": rel.as_posix(), "source_mode": mode, "alpha": "copied unchanged" if alpha is not None else None,
        "class": cls, **image_fidelity(clean, protected, ssim_max_side=tile),
    }
    return out_rel.as_posix(), entry


@torch.no_grad()
def protect_folder(
    pl_module,
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    label: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    tile: int = 512,
    overlap: int = 32,
) -> Path:
    """Protect a plain folder of a user's own images (any sizes) into PNGs beside a manifest.

    The generator is fully convolutional, so each image is perturbed at its own resolution, in
    tiles of `tile` pixels (plus `overlap` of discarded context) so that memory does not grow
    with the image. A label-conditioned generator needs a class: sub-folders are mapped to
    classes in sorted order (modulo the number of classes); loose images get `label`. Outputs are
    named `<source name>.png` (`a.jpg` -> `a.jpg.png`); pixel modes follow
    `fuse_lightning.images` (alpha is copied unchanged, 16-bit grayscale is scaled to 8 bits,
    CMYK and other modes are refused).

    Args:
        pl_module: A trained FUSEModule.
        folder: Input folder (searched recursively).
        out_dir: Output folder (atomic write; refuses to overwrite without `overwrite`).
        label: Class used for images directly under `folder`.
        overwrite: Replace an existing output folder.
        progress: Show a progress bar.
        tile: Tile side in pixels.
        overlap: Context margin of each tile in pixels.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    num_classes = int(pl_module.hparams.num_classes)
    if not 0 <= label < num_classes:
        raise ValueError(f"--label must be in [0, {num_classes}), got {label}")
    subdirs = sorted({p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1})
    class_of = {name: i % num_classes for i, name in enumerate(subdirs)}
    with atomic_output_dir(out_dir, overwrite) as (final, tmp):
        pl_module.eval()
        eps = float(pl_module.hparams.eps)
        per_image = {}
        for path in tqdm(files, desc=f"protect {folder.name}", disable=not progress):
            rel = path.relative_to(folder)
            cls = class_of.get(rel.parts[0], label) if len(rel.parts) > 1 else label
            out_rel, entry = _protect_image(pl_module, path, rel, cls, tmp, eps, tile, overlap)
            per_image[out_rel] = entry
        write_manifest(
            tmp,
            {
                "method": "fuse",
                "source_folder": str(folder.resolve()),
                "eps_255": eps,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "code_version": code_version(),
                "model_config": dict(pl_module.hparams),
                "tile": tile,
                "overlap": overlap,
                "images": per_image,
            },
        )
    return final


# Sections of a training config that `fuse protect --config` accepts and does not use.
TRAINING_ONLY_KEYS = ("trainer", "optimizer", "lr_scheduler", "ckpt_path", "weights_only")


def build_protect_parser(link_data: bool = True):
    """The argument parser of `fuse protect` (jsonargparse: `--config`, dotted `--data.*` flags).

    Args:
        link_data: Link the DataModule's `num_classes`, `image_size`, `mean` and `std` into the
            model, as training does; off for `--images`, where no DataModule is built.
    """
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    from fuse_lightning.data.base import ImageClassificationDataModule
    from fuse_lightning.fuse_module import FUSEModule
    from fuse_lightning.links import import_config_classes, link_data_to_model

    import_config_classes()
    parser = ArgumentParser(
        prog="fuse protect",
        description="Write a protected dataset from a trained FUSE checkpoint. The checkpoint's saved "
        "hyperparameters rebuild the model and the DataModule; --config and dotted flags "
        "(--data.data_dir DIR, --model.*) override them.",
        parser_mode="omegaconf+",
    )
    parser.add_argument("--config", action=ActionConfigFile,
                        help="Config overriding the checkpoint's settings (repeatable, the last wins); a "
                        "training config works, its trainer section is ignored.")
    parser.add_argument("--ckpt", type=str, required=True, help="FUSE checkpoint (.ckpt).")
    parser.add_argument("--out", type=str, required=True, help="Output directory (written atomically).")
    parser.add_argument("--overwrite", action=ActionYesNo, default=False, help="Replace an existing --out.")
    parser.add_argument("--mode", type=Literal["samplewise", "classwise"] | None, default=None,
                        help="Export mode; default: the model's.")
    parser.add_argument("--images", type=str | None, default=None,
                        help="Protect this folder of images instead of the training set.")
    parser.add_argument("--label", type=int, default=0, help="Class for loose images in --images.")
    parser.add_argument("--tile", type=int, default=512, help="--images: tile side in pixels (bounds memory).")
    parser.add_argument("--overlap", type=int, default=32, help="--images: context margin of each tile.")
    parser.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:1 or auto.")
    parser.add_argument("--wandb_project", type=str | None, default=None,
                        help="Also log the export as a W&B artifact in this project.")
    parser.add_argument("--wandb_artifact", type=str | None, default=None,
                        help="Its artifact name (default: the --out directory's name).")
    parser.add_argument("--seed_everything", type=bool | int | None, default=None,
                        help="Seed recorded in the manifest (an integer seeds the run).")
    for key in TRAINING_ONLY_KEYS:
        parser.add_argument(f"--{key}", type=Any, default=None, help=f"Ignored ({key} of a training config).")
    parser.add_subclass_arguments(FUSEModule, "model", required=False)
    parser.add_subclass_arguments(ImageClassificationDataModule, "data", required=False)
    if link_data:
        link_data_to_model(parser)
    return parser


def _imported_class(class_path: str, base: type, ckpt: Path) -> type:
    """The class named by a checkpoint, which must already be imported and derive from `base`.

    Nothing is imported on a checkpoint's say (as Lightning's `load_from_checkpoint` does).
    """
    import sys

    from fuse_lightning.checkpoints import CheckpointError

    module_name, _, name = str(class_path).rpartition(".")
    cls = getattr(sys.modules.get(module_name), name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise CheckpointError(
            f"{ckpt}: refusing the class {class_path!r} it names: not an imported subclass of {base.__name__}"
        )
    return cls


def _check_nested_classes(value: Any, ckpt: Path) -> None:
    """Every `class_path` inside saved hyperparameters must name an imported class."""
    if isinstance(value, dict):
        if "class_path" in value and "." in str(value["class_path"]):
            _imported_class(value["class_path"], object, ckpt)
        for item in value.values():
            _check_nested_classes(item, ckpt)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_nested_classes(item, ckpt)


def _saved_group(hparams: dict[str, Any], base: type, default_class: type | None, ckpt: Path,
                 skip: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """`{class_path, init_args}` from a checkpoint's saved hyperparameters (None without a class).

    Only the class's constructor arguments are kept (minus `skip`), as `load_from_checkpoint` does.
    """
    import inspect

    hparams = dict(hparams)
    hparams.pop("_instantiator", None)
    class_path = hparams.pop("_class_path", None)
    if class_path is None and default_class is None:
        return None
    cls = _imported_class(class_path, base, ckpt) if class_path is not None else default_class
    accepted = inspect.signature(cls.__init__).parameters
    init_args = {k: v for k, v in hparams.items() if k in accepted and k not in skip}
    _check_nested_classes(init_args, ckpt)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def checkpoint_defaults(state: dict[str, Any], ckpt: Path, link_data: bool = True) -> dict[str, Any]:
    """The `model` and `data` settings a FUSE checkpoint saved, as parser defaults.

    Args:
        state: The loaded checkpoint.
        ckpt: Its path (for messages).
        link_data: The model's DataModule-linked arguments come from the DataModule (left out).

    Returns:
        `{"model": {...}}` plus `"data"` when the checkpoint holds the DataModule's settings.
    """
    from fuse_lightning.data.base import ImageClassificationDataModule
    from fuse_lightning.fuse_module import FUSEModule
    from fuse_lightning.links import LINKED_DATA_ATTRIBUTES

    skip = LINKED_DATA_ATTRIBUTES if link_data else ()
    defaults = {"model": _saved_group(state.get("hyper_parameters") or {}, FUSEModule, FUSEModule, ckpt, skip)}
    data = state.get("datamodule_hyper_parameters")
    if data:
        group = _saved_group(data, ImageClassificationDataModule, None, ckpt)
        if group is not None:
            defaults["data"] = group
    return defaults


def _prescan(argv: list[str]) -> tuple[str | None, bool]:
    """`--ckpt` and whether `--images` is given, before the full parser is built."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--ckpt", default=None)
    pre.add_argument("--images", default=None)
    known, _ = pre.parse_known_args(argv)
    return known.ckpt, known.images is not None


def protect_main(argv: list[str]) -> int:
    """`fuse protect --ckpt CKPT --out DIR [--images FOLDER] [--config CFG] [--data.data_dir D] ...`.

    Rebuilds the FUSE model and its DataModule from the checkpoint's saved hyperparameters (a
    config is optional: `--config` and dotted flags override), loads the weights (weights-only)
    and writes the protected training set in the source's format — or, with `--images`,
    protected PNGs of a plain folder.
    """
    from fuse_lightning.checkpoints import CheckpointError, load_checkpoint

    ckpt_arg, images = _prescan(list(argv))
    parser = build_protect_parser(link_data=not images)
    state = None
    if ckpt_arg is not None:
        ckpt = Path(ckpt_arg)
        if not ckpt.is_file():
            parser.error(f"--ckpt {ckpt} does not exist")
        try:
            state = load_checkpoint(ckpt)
            parser.set_defaults(checkpoint_defaults(state, ckpt, link_data=not images))
        except CheckpointError as err:
            parser.error(str(err))
    cfg = parser.parse_args(list(argv))
    ckpt = Path(cfg.ckpt)
    if Path(cfg.out).exists() and not cfg.overwrite:
        parser.error(f"--out {cfg.out} already exists; pass --overwrite to replace it")
    if cfg.get("model") is None:
        parser.error(f"{ckpt} holds no model settings; pass --config with the training config")
    if images:
        cfg.data = None  # a folder of images needs no DataModule
    elif cfg.get("data") is None:
        parser.error(f"{ckpt} holds no DataModule settings (written by an older version); pass --config "
                     "with the training config, or --data with the DataModule")
    if isinstance(cfg.seed_everything, int) and not isinstance(cfg.seed_everything, bool):
        import lightning as L

        L.seed_everything(cfg.seed_everything)
    init = parser.instantiate_classes(cfg)
    model, datamodule = init.model, init.data
    try:
        model.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError) as err:
        parser.error(f"cannot load {ckpt} into {type(model).__name__}: {err}")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    model.to(device).eval()
    if images:
        out = protect_folder(model, cfg.images, cfg.out, label=cfg.label, overwrite=cfg.overwrite,
                             tile=cfg.tile, overlap=cfg.overlap)
    else:
        mode = cfg.mode or model.hparams.mode
        info = run_manifest(model, datamodule, mode=mode, ckpt_path=str(ckpt.resolve()))
        out = protect_dataset(
            datamodule, model.make_perturb_fn(datamodule, mode), cfg.out, eps=model.hparams.eps,
            manifest=info, overwrite=cfg.overwrite, device=device,
        )
    print(f"protected data written to {out}")
    if cfg.wandb_project:
        from fuse_lightning.wandb_artifacts import log_export

        log_export(out, cfg.wandb_project, cfg.wandb_artifact, "fuse protect")
    return 0
