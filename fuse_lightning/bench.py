"""Benchmarks as ratios: `make bench` (or `python -m fuse_lightning.bench --device cuda`).

Every figure is measured side by side in one run, on the same device, model, batch and data:

- victim training: the project's Lightning path (VictimModule + resident-uint8 DataModule,
  on-device crop/flip, Trainer) against a plain PyTorch loop doing the same work;
- FUSE training: `FUSEModule` under the Trainer against the same step written as a plain loop;
- protection: generator inference + uint8 quantisation, against the FLOP bound of this device
  (the generator's counted FLOPs at the measured dense-matmul rate, the best a conv net can do);
- end to end (`--data_dir`, not with `--quick`): wall time to a protected CIFAR-10 training set
  with the shipped CPU configs, FUSE (train + export) against EM sample-wise and class-wise;
- peak memory of each: every item runs in its own process, so its peak RSS (and peak CUDA
  memory) is its own.

Synthetic CIFAR-sized data is used except for the end-to-end times. Figures go to the docs and to
issue notes; tests never assert on time (`--json` writes them for tools such as the GPU check).
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from argparse import SUPPRESS
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from fuse_lightning.allocator import keep_freed_memory

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


# ------------------------------------------------------------------------------ timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loop_rate(step: Callable[[], None], batch: int, steps: int, device: torch.device, warmup: int = 3) -> float:
    """Images/s of `steps - warmup` calls of a training step after `warmup` calls (total time,
    as the Lightning items are measured)."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps - warmup):
        step()
    _sync(device)
    return batch * (steps - warmup) / (time.perf_counter() - start)


def synthetic_cifar(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random uint8 CIFAR-shaped images and labels (resident, like the real DataModule's)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
            torch.randint(0, 10, (n,), generator=gen))


class _StepClock:
    """Lightning callback: wall time and images of the training batches after `warmup` batches."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        import lightning as L

        clock = self

        class Callback(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx == warmup:
                    _sync(device)
                    clock.start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if batch_idx >= warmup:
                    clock.images += int(batch[0].shape[0])

            def on_train_epoch_end(self, trainer, pl_module):
                _sync(device)
                clock.end = time.perf_counter()

        self.callback = Callback()
        self.start = self.end = 0.0
        self.images = 0

    @property
    def rate(self) -> float:
        """Images per second over the timed batches."""
        if self.images == 0 or self.end <= self.start:
            raise RuntimeError("no timed batches: raise --steps above the 3 warm-up steps")
        return self.images / (self.end - self.start)


def _trainer(device: torch.device, callbacks: list, precision: str | None = None):
    """One epoch over the data (FUSE counts two optimizer steps per batch, so no max_steps)."""
    import lightning as L

    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, precision=precision,
    )


def _datamodule(images: torch.Tensor, labels: torch.Tensor, batch: int, augment: bool):
    from fuse_lightning.data import ResidentImageDataModule

    class Synthetic(ResidentImageDataModule):
        _num_classes = 10

        def _load_split(self, split: str):
            return images, labels

    return Synthetic(batch_size=batch, augment=augment)


# ------------------------------------------------------------------------------ victim


def victim_plain(arch: str, batch: int, steps: int, device: torch.device, precision: str | None, **kw) -> float:
    """Images/s of a plain loop: resident uint8 -> device -> float -> crop/flip -> SGD step."""
    from fuse_lightning.data.base import random_crop_flip
    from fuse_lightning.nets.normalized import classifier_with_normalization

    images, labels = synthetic_cifar(batch * steps)
    net = classifier_with_normalization(arch, 10, 32, MEAN, STD, kw or None).to(device)
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    perm = torch.randperm(len(labels))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    state = {"i": 0}

    def step() -> None:
        idx = perm[(state["i"] % steps) * batch:(state["i"] % steps + 1) * batch]
        state["i"] += 1
        x = images[idx].to(device, non_blocking=True).float().div_(255)
        x = random_crop_flip(x, 4).contiguous(memory_format=torch.channels_last)
        y = labels[idx].to(device, non_blocking=True)
        with autocast:
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return loop_rate(step, batch, steps, device)


def victim_lightning(arch: str, batch: int, steps: int, device: torch.device, precision: str | None, **kw) -> float:
    """Images/s of the project's path: VictimModule + resident DataModule under the Trainer."""
    from fuse_lightning.victim import VictimModule

    images, labels = synthetic_cifar(batch * steps)
    model = VictimModule(arch=arch, arch_kwargs=kw or None, lr=0.05, scheduler="none")
    clock = _StepClock(3, device)
    _trainer(device, [clock.callback], precision).fit(model, datamodule=_datamodule(images, labels, batch, True))
    return clock.rate


# ------------------------------------------------------------------------------ FUSE


def _fuse_model(device_type: str, **overrides):
    from fuse_lightning.fuse_module import FUSEModule

    if device_type == "cuda":  # the GPU config: ResNet-18 surrogate, U-Net generator
        return FUSEModule(surrogate_arch="resnet18", generator_arch="unet", generator_width=32, **overrides)
    return FUSEModule(surrogate_arch="fastnet", surrogate_kwargs={"width": 0.5}, generator_arch="encdec",
                      generator_width=16, **overrides)


def fuse_plain(batch: int, steps: int, device: torch.device, precision: str | None) -> float:
    """Images/s of the FUSE step (k surrogate updates, one generator update) as a plain loop."""
    model = _fuse_model(device.type).to(device)
    images, labels = synthetic_cifar(batch * steps)
    opt_f = torch.optim.SGD(model.surrogate.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=1e-3)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    state = {"i": 0}

    def step() -> None:
        i = state["i"] % steps
        state["i"] += 1
        x = images[i * batch:(i + 1) * batch].to(device).float().div_(255)
        y = labels[i * batch:(i + 1) * batch].to(device)
        with autocast:
            model.surrogate.train()
            with torch.no_grad():
                delta = model.perturbation(x, y)
            loss = F.cross_entropy(model.surrogate((x + delta).clamp(0, 1)), y)
        opt_f.zero_grad(set_to_none=True)
        loss.backward()
        opt_f.step()
        model.surrogate.eval()
        model.surrogate.requires_grad_(False)
        with autocast:
            terms = model.generator_losses(x, y)
        opt_g.zero_grad(set_to_none=True)
        terms["loss_generator"].backward()
        torch.nn.utils.clip_grad_norm_(model.generator.parameters(), 1.0)
        opt_g.step()
        model.surrogate.requires_grad_(True)

    return loop_rate(step, batch, steps, device)


def fuse_lightning(batch: int, steps: int, device: torch.device, precision: str | None) -> float:
    """Images/s of `FUSEModule.training_step` under the Trainer, same model, batch and data."""
    images, labels = synthetic_cifar(batch * steps)
    model = _fuse_model(device.type, log_spectrum_every_n_steps=10**9)
    clock = _StepClock(3, device)
    _trainer(device, [clock.callback], precision).fit(model, datamodule=_datamodule(images, labels, batch, False))
    return clock.rate


# ------------------------------------------------------------------------------ protection


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Measured dense-matmul FLOP/s: the roofline a conv net's FLOPs can at best run at."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: torch.mm(a, b), device, warmup=2, repeats=5)
    return 2 * n**3 / seconds


def protect_vs_bound(batch: int, device: torch.device) -> dict[str, float]:
    """Protection images/s, the generator's FLOPs per image and the FLOP-bound fraction."""
    from torch.utils.flop_counter import FlopCounterMode

    from fuse_lightning.budget import quantize_protected

    model = _fuse_model(device.type).to(device).eval()
    clean = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    @torch.no_grad()
    def step() -> None:
        quantize_protected(clean, model.perturbation(clean.float() / 255, y), 8)

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.perturbation(clean.float() / 255, y)
    flops_per_image = counter.get_total_flops() / batch
    rate = batch / timed(step, device, warmup=2, repeats=5)
    # fp32 (TF32 where the backend allows it): protection runs without autocast.
    peak = matmul_peak(device, torch.float32)
    return {"protect_img_per_s": rate, "generator_gflop_per_image": flops_per_image / 1e9,
            "matmul_peak_tflops": peak / 1e12, "flop_bound_img_per_s": peak / flops_per_image,
            "fraction_of_flop_bound": rate * flops_per_image / peak}


# ------------------------------------------------------------------------------ items


def run_item(name: str, device: torch.device, batch: int, steps: int, precision: str | None) -> dict[str, Any]:
    """One measurement, in this process (the parent runs each item in its own process)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    arch, kw = ("resnet18", {}) if device.type == "cuda" else ("fastnet", {"width": 0.5})
    items: dict[str, Callable[[], Any]] = {
        "victim_plain": lambda: victim_plain(arch, batch, steps, device, precision, **kw),
        "victim_lightning": lambda: victim_lightning(arch, batch, steps, device, precision, **kw),
        "fuse_plain": lambda: fuse_plain(batch, steps, device, precision),
        "fuse_lightning": lambda: fuse_lightning(batch, steps, device, precision),
        "protect": lambda: protect_vs_bound(512, device),
    }
    value = items[name]()
    out = value if isinstance(value, dict) else {"img_per_s": value}
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    out["model"] = f"{arch} {kw or ''}".strip() if name.startswith("victim") else "FUSE " + (
        "resnet18 + unet w32" if device.type == "cuda" else "fastnet w0.5 + encdec w16")
    return out


def _child_pythonpath() -> str:
    """The repository first, then the caller's PYTHONPATH (packages installed with `pip --target`)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: the caller's, `extra`, and the PYTHONPATH above."""
    return {**os.environ, **(extra or {}), "PYTHONPATH": _child_pythonpath()}


def spawn_item(name: str, args: Namespace, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one item in a fresh process (with extra environment `env`) and return its JSON line."""
    cmd = [sys.executable, "-m", "fuse_lightning.bench", "--item", name, "--device", args.device,
           "--batch", str(args.batch), "--steps", str(args.steps)]
    if args.precision:
        cmd += ["--precision", args.precision]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(env))
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def end_to_end(data_dir: str, work: Path) -> dict[str, Any]:
    """Wall time (and peak RSS) to a protected CIFAR-10 training set with the shipped CPU configs."""
    # Run in `work` with configs/ linked there: the shipped configs' relative output paths
    # (checkpoints, the FUSE export) land in `work`, not in the user's outputs/.
    from fuse_lightning.gpu_check import prepare_work_dir

    prepare_work_dir(work)
    data = ["--data.init_args.data_dir", str(Path(data_dir).resolve())]
    commands = {
        "FUSE (train + export), configs/fuse_cifar10_cpu.yaml": [
            "fit", "--config", "configs/fuse_cifar10.yaml", "--config", "configs/fuse_cifar10_cpu.yaml", *data, "--trainer.enable_progress_bar", "false"],
        "EM sample-wise, configs/baselines/em_cifar10_cpu.yaml": [
            "baseline", "--config", "configs/baselines/em_cifar10_cpu.yaml", *data, "--out", str(work / "em"),
            "--overwrite"],
        "EM class-wise (CPU surrogate), em_classwise_cifar10.yaml + em_cifar10_cpu.yaml": [
            "baseline", "--config", "configs/baselines/em_cifar10_cpu.yaml", *data,
            "--method.init_args.mode", "classwise", "--out", str(work / "em_classwise"), "--overwrite"],
    }
    rows = {}
    for label, words in commands.items():
        cmd = [sys.executable, "-m", "fuse_lightning", *words]
        start = time.perf_counter()
        timer = ["/usr/bin/time", "-f", "%M"] if Path("/usr/bin/time").exists() else []  # peak RSS, KiB
        done = subprocess.run([*timer, *cmd], cwd=work, capture_output=True, text=True,
                              env=_child_env())
        seconds = time.perf_counter() - start
        lines = done.stderr.strip().splitlines()
        peak_kib = lines.pop() if timer and lines else None  # GNU time prints its figure last
        # The report names the data directory as the user gave it, not this machine's absolute path.
        shown = ["fuse", *(data_dir if w == data[1] else w for w in words)]
        row: dict[str, Any] = {"seconds": round(seconds, 1), "command": shlex.join(shown)}
        if done.returncode != 0:
            errors = [ln for ln in lines if "error" in ln.lower() and not ln.startswith("Command exited")]
            row["error"] = (errors or lines or ["?"])[-1]
        elif peak_kib is not None:
            row["peak_rss_mib"] = round(int(peak_kib.split()[-1]) / 1024)
        rows[label] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fuse_lightning.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=str, default="auto", help="cpu, cuda or auto.")
    parser.add_argument("--batch", type=int, default=256, help="Training batch size of every item.")
    parser.add_argument("--steps", type=int, default=20, help="Training steps per item (3 are warm-up).")
    parser.add_argument("--precision", type=str | None, default=None,
                        help="Lightning precision, e.g. bf16-mixed (default: fp32).")
    parser.add_argument("--quick", action=ActionYesNo, nargs="?", default=False, help="Skip the end-to-end times.")
    parser.add_argument("--data_dir", type=str | None, default=None, help="CIFAR-10 root for the end-to-end times.")
    parser.add_argument("--json", type=str | None, default=None, help="Also write the figures to this JSON file.")
    parser.add_argument("--item", type=str | None, default=None, help=SUPPRESS)  # child process: one item
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.item:
        keep_freed_memory()  # as the CLI does; FUSE_MALLOC_TUNING=off measures the default
        print(json.dumps(run_item(args.item, device, args.batch, args.steps, args.precision)))
        return 0

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device: {device} ({where}), batch {args.batch}, {args.steps} steps, precision "
          f"{args.precision or 'fp32'}, torch {torch.__version__}", flush=True)
    items = {name: spawn_item(name, args) for name in
             ("victim_plain", "victim_lightning", "fuse_plain", "fuse_lightning", "protect")}
    # The same FUSE loop with glibc's default allocator settings (fuse_lightning/allocator.py).
    items["fuse_plain_default_malloc"] = spawn_item("fuse_plain", args, {"FUSE_MALLOC_TUNING": "off"})
    report: dict[str, Any] = {"device": str(device), "device_name": where, "batch": args.batch,
                              "precision": args.precision or "fp32", "torch": torch.__version__, "items": items}
    ratios = {}
    if "img_per_s" in items["victim_plain"] and "img_per_s" in items["victim_lightning"]:
        ratios["victim: Lightning overhead vs plain loop"] = (
            items["victim_plain"]["img_per_s"] / items["victim_lightning"]["img_per_s"] - 1)
    if "img_per_s" in items["fuse_plain"] and "img_per_s" in items["fuse_lightning"]:
        ratios["FUSE: Lightning overhead vs plain loop"] = (
            items["fuse_plain"]["img_per_s"] / items["fuse_lightning"]["img_per_s"] - 1)
    if "img_per_s" in items["fuse_plain"] and "img_per_s" in items["fuse_plain_default_malloc"]:
        ratios["FUSE: speed-up from keeping freed memory (allocator.py)"] = (
            items["fuse_plain"]["img_per_s"] / items["fuse_plain_default_malloc"]["img_per_s"] - 1)
    if "fraction_of_flop_bound" in items["protect"]:
        ratios["protection: fraction of the FLOP bound"] = items["protect"]["fraction_of_flop_bound"]
    report["ratios"] = ratios
    if args.data_dir and not args.quick:
        report["end_to_end"] = end_to_end(args.data_dir, REPO / "outputs" / "bench")
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if all("error" not in v for v in items.values()) else 1


def format_report(report: dict[str, Any]) -> str:
    """Markdown tables of a bench report."""
    lines = ["| item | model | images/s | peak RSS MiB | peak CUDA MiB |", "|---|---|---:|---:|---:|"]
    for name, v in report["items"].items():
        if "error" in v:
            lines.append(f"| {name} | error: {v['error']} | | | |")
            continue
        rate = v.get("img_per_s", v.get("protect_img_per_s", 0))
        lines.append(f"| {name} | {v['model']} | {rate:.0f} | {v['peak_rss_mib']:.0f} | "
                     f"{v.get('peak_cuda_mib', float('nan')):.0f} |")
    protect = report["items"].get("protect", {})
    if "generator_gflop_per_image" in protect:
        lines += ["", f"Protection: {protect['generator_gflop_per_image']:.3f} GFLOP/image, measured fp32 matmul peak "
                  f"{protect['matmul_peak_tflops']:.2f} TFLOP/s -> FLOP bound {protect['flop_bound_img_per_s']:.0f} img/s"]
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:+.1%} |" if "overhead" in k or "speed-up" in k else f"| {k} | {v:.1%} |" for k, v in report["ratios"].items()]
    if report.get("end_to_end"):
        lines += ["", "| time to a protected CIFAR-10 set | seconds | peak RSS MiB |", "|---|---:|---:|"]
        for k, v in report["end_to_end"].items():
            lines.append(f"| {k} | {v['seconds']} | {v.get('peak_rss_mib', v.get('error', ''))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
