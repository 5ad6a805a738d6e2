"""Throughput benchmarks: `make bench` (or `python -m fuse_lightning.bench --device cuda`).

Measures, on synthetic CIFAR-sized batches (no data needed):
- spectral masking (RSM band removal) per batch,
- generator forward+backward (encdec, unet),
- victim training steps (fastnet, resnet18),
- one full FUSE step (k surrogate updates + generator update, CPU and GPU configs),
- protection (generator inference + uint8 quantization),
and prints images/s (median of the timed repeats) plus peak memory. Numbers go to the docs and
issue notes; tests never assert on time.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fuse_lightning import spectral
from fuse_lightning.budget import quantize_protected
from fuse_lightning.fuse_module import FUSEModule
from fuse_lightning.nets import build_generator
from fuse_lightning.victim import classifier_with_normalization

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def bench_victim(arch: str, batch: int, device: torch.device, channels_last: bool, **kw) -> float:
    net = classifier_with_normalization(arch, 10, 32, MEAN, STD, kw or None).to(device)
    x = torch.rand(batch, 3, 32, 32, device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / timed(step, device)


def bench_generator(arch: str, batch: int, device: torch.device, width: int) -> float:
    gen = build_generator(arch, base_width=width).to(device)
    x = torch.rand(batch, 3, 32, 32, device=device)

    def step() -> None:
        gen(x).square().mean().backward()

    return batch / timed(step, device)


def bench_fuse_step(batch: int, device: torch.device, surrogate: str, generator: str, gen_width: int, **kw) -> float:
    model = FUSEModule(surrogate_arch=surrogate, generator_arch=generator, generator_width=gen_width, surrogate_kwargs=kw or None).to(device)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt_f = torch.optim.SGD(model.surrogate.parameters(), lr=0.05, momentum=0.9)
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=1e-3)

    def step() -> None:  # the body of FUSEModule.training_step without Lightning's bookkeeping
        model.surrogate.train()
        with torch.no_grad():
            delta = model.perturbation(x, y)
        loss = F.cross_entropy(model.surrogate((x + delta).clamp(0, 1)), y)
        opt_f.zero_grad(set_to_none=True)
        loss.backward()
        opt_f.step()
        model.surrogate.eval()
        model.surrogate.requires_grad_(False)
        terms = model.generator_losses(x, y)
        opt_g.zero_grad(set_to_none=True)
        terms["loss_generator"].backward()
        opt_g.step()
        model.surrogate.requires_grad_(True)

    return batch / timed(step, device, warmup=1, repeats=3)


def bench_protect(batch: int, device: torch.device, generator: str, width: int) -> float:
    model = FUSEModule(surrogate_arch="fastnet", generator_arch=generator, generator_width=width).to(device).eval()
    clean = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    @torch.no_grad()
    def step() -> None:
        quantize_protected(clean, model.perturbation(clean.float() / 255, y), 8)

    return batch / timed(step, device)


def bench_masking(batch: int, device: torch.device) -> float:
    delta = torch.rand(batch, 3, 32, 32, device=device)

    def step() -> None:
        start, width = spectral.sample_band(batch, device=device)
        spectral.remove_band(delta, start, width)

    return timed(step, device, repeats=20) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fuse-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="only the CPU-sized models")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    b = args.batch
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), batch {b}, torch {torch.__version__}")
    rows: list[tuple[str, str]] = [("RSM band removal (ms / batch)", f"{bench_masking(b, device):.2f}")]
    rows.append(("generator encdec w16 fwd+bwd (img/s)", f"{bench_generator('encdec', b, device, 16):.0f}"))
    rows.append(("victim fastnet w0.5 train (img/s)", f"{bench_victim('fastnet', b, device, True, width=0.5):.0f}"))
    rows.append(("victim fastnet w1 train, channels_last (img/s)", f"{bench_victim('fastnet', b, device, True):.0f}"))
    rows.append(("victim fastnet w1 train, contiguous (img/s)", f"{bench_victim('fastnet', b, device, False):.0f}"))
    rows.append(("FUSE step, CPU config (img/s)", f"{bench_fuse_step(b, device, 'fastnet', 'encdec', 16, width=0.5):.0f}"))
    rows.append(("protect, encdec w16 (img/s)", f"{bench_protect(512, device, 'encdec', 16):.0f}"))
    if not args.quick:
        rows.append(("generator unet w32 fwd+bwd (img/s)", f"{bench_generator('unet', b, device, 32):.0f}"))
        rows.append(("victim resnet18 train (img/s)", f"{bench_victim('resnet18', b, device, True):.0f}"))
        rows.append(("FUSE step, GPU config: resnet18 + unet (img/s)", f"{bench_fuse_step(b, device, 'resnet18', 'unet', 32):.0f}"))
        rows.append(("protect, unet w32 (img/s)", f"{bench_protect(512, device, 'unet', 32):.0f}"))
    if device.type == "cuda":
        rows.append(("peak GPU memory (MiB)", f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}"))
    rows.append(("peak host RSS (MiB)", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
