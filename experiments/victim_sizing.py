"""Size victim architectures for a CPU budget: training throughput and parameters per candidate.

The standard protocol (configs/sweeps/cifar10_standard_cpu.yaml) trains every victim on all
50 000 CIFAR-10 images, so the architectures and widths are chosen by what one epoch costs here.
Each candidate is timed with the benchmark's plain training loop (resident uint8 data, crop/flip,
one SGD step per batch; `fuse_lightning.bench.victim_plain`), so the figures compare with
`make bench`.

    python experiments/victim_sizing.py --out experiments/results/victim_sizing_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from fuse_lightning.bench import victim_plain
from fuse_lightning.nets import build_classifier
from fuse_lightning.results import atomic_write_text

# (arch, arch_kwargs): the full-size nets of the literature's victims and CPU-sized versions.
CANDIDATES: list[tuple[str, dict]] = [
    ("fastnet", {"width": 0.5}),
    ("fastnet", {}),
    ("resnet18", {"width": 16}),
    ("resnet18", {"width": 32}),
    ("mobilenet_v2", {"width_mult": 0.5}),
    ("mobilenet_v2", {}),
    ("vit_small", {"hidden_dim": 192, "mlp_dim": 384, "num_layers": 4, "num_heads": 4}),
    ("vgg16_bn", {"width": 0.25}),
    ("vgg16_bn", {}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown table to write")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per candidate (after 3 warm-up)")
    parser.add_argument("--train_images", type=int, default=50_000, help="images per epoch")
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    lines = [
        f"# Victim sizing ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, batch {args.batch})",
        "",
        f"Plain training loop (`fuse_lightning.bench.victim_plain`); minutes per epoch of {args.train_images} images.",
        "",
        "| arch | kwargs | params (M) | images/s | min / epoch |",
        "|---|---|---:|---:|---:|",
    ]
    for arch, kwargs in CANDIDATES:
        params = sum(p.numel() for p in build_classifier(arch, 10, **kwargs).parameters()) / 1e6
        rate = victim_plain(arch, args.batch, args.steps + 3, device, None, **kwargs)
        minutes = args.train_images / rate / 60
        lines.append(f"| {arch} | {kwargs or '–'} | {params:.2f} | {rate:.0f} | {minutes:.1f} |")
        print(lines[-1], flush=True)
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
