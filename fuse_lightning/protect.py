"""Write a protected copy of a training set: perturb, quantize to uint8 within budget, export.

Every method of the project (FUSE and the baselines) reduces to a *perturbation function*
`delta = perturb_fn(images, labels, indices)` on float images in [0, 1]. `protect_dataset` turns it
into a protected dataset in the source's own on-disk format (CIFAR pickle batches, or a PNG tree for
ImageNet subsets) plus a `manifest.json`, guaranteeing ‖x_protected − x‖∞ ≤ ε in uint8 units.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place only
when complete, so an interrupted export never leaves a half-written dataset behind.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from tqdm.auto import tqdm

import fuse_lightning
from fuse_lightning.budget import linf_uint8, quantize_protected
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

    Returns:
        The final output directory.
    """
    final, tmp = prepare_output_dir(out_dir, overwrite)
    try:
        datamodule.setup("fit")
        # The training set the run was configured with (its `train_subset`, if any), clean.
        loader = datamodule.protect_dataloader(batch_size=batch_size, use_subset=True)
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
        commit_output_dir(tmp, final)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    from PIL import Image

    from fuse_lightning.images import output_name, perturb_tiled, read_image

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
    final, tmp = prepare_output_dir(out_dir, overwrite)
    try:
        pl_module.eval()
        eps = float(pl_module.hparams.eps)
        device = pl_module.device
        per_image = {}
        for path in tqdm(files, desc=f"protect {folder.name}", disable=not progress):
            rel = path.relative_to(folder)
            rgb, alpha, mode = read_image(path)
            clean = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(device)
            cls = class_of.get(rel.parts[0], label) if len(rel.parts) > 1 else label
            y = torch.tensor([cls], device=device)
            delta = perturb_tiled(lambda crop, y=y: pl_module.perturbation(crop, y), clean.float() / 255, tile, overlap)
            protected = quantize_protected(clean, delta, eps)
            del delta
            out_rel = output_name(rel.as_posix())
            target = tmp / out_rel
            target.parent.mkdir(parents=True, exist_ok=True)
            pixels = protected[0].permute(1, 2, 0).cpu().numpy()
            if alpha is not None:
                pixels = np.concatenate([pixels, alpha[..., None]], axis=2)
            Image.fromarray(pixels).save(target)
            per_image[out_rel.as_posix()] = {
                "source": rel.as_posix(), "source_mode": mode, "alpha": "copied unchanged" if alpha is not None else None,
                "class": cls, **image_fidelity(clean, protected, ssim_max_side=tile),
            }
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
        commit_output_dir(tmp, final)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def protect_main(argv: list[str]) -> int:
    """`fuse protect --ckpt CKPT --config CFG --out DIR [--images FOLDER] [...]`.

    Loads the model (and DataModule) described by the config(s), restores the checkpoint's
    weights, and writes the protected training set in the source's format — or, with
    `--images`, protected PNGs of a plain folder. Any other flag (e.g. `--data.data_dir`) is
    passed to the config parser.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="fuse protect",
        description="Write a protected dataset from a trained FUSE checkpoint.",
        epilog="Remaining flags (--config, --data.data_dir, ...) go to the Lightning config parser.",
    )
    parser.add_argument("--ckpt", required=True, help="FUSE checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--mode", choices=["samplewise", "classwise"], default=None, help="default: the model's")
    parser.add_argument("--images", default=None, help="protect this folder of images instead of the training set")
    parser.add_argument("--label", type=int, default=0, help="class for loose images in --images")
    parser.add_argument("--tile", type=int, default=512, help="--images: tile side in pixels (bounds memory)")
    parser.add_argument("--overlap", type=int, default=32, help="--images: context margin of each tile")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    args, rest = parser.parse_known_args(argv)
    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        parser.error(f"--ckpt {ckpt} does not exist")
    if Path(args.out).exists() and not args.overwrite:
        parser.error(f"--out {args.out} already exists; pass --overwrite to replace it")
    from fuse_lightning.cli import build_cli

    cli = build_cli(rest + ["--trainer.logger", "false"], run=False)
    model, datamodule = cli.model, cli.datamodule
    from fuse_lightning.checkpoints import CheckpointError, load_checkpoint

    try:
        state = load_checkpoint(ckpt)
    except CheckpointError as err:
        parser.error(str(err))
    try:
        model.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError) as err:
        parser.error(f"cannot load {ckpt} into {type(model).__name__}: {err}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    model.to(device).eval()
    if args.images:
        out = protect_folder(model, args.images, args.out, label=args.label, overwrite=args.overwrite,
                             tile=args.tile, overlap=args.overlap)
    else:
        mode = args.mode or model.hparams.mode
        info = run_manifest(model, datamodule, mode=mode, ckpt_path=str(ckpt.resolve()))
        out = protect_dataset(
            datamodule, model.make_perturb_fn(datamodule, mode), args.out, eps=model.hparams.eps,
            manifest=info, overwrite=args.overwrite, device=device,
        )
    print(f"protected data written to {out}")
    return 0
