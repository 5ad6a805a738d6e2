"""What each method's perturbation looks like: energy per radial band, grey part, class code.

For each protected CIFAR set, delta = protected - clean (uint8 difference, in 1/255 units) over
the same class-stratified subset, and:

* `rms`, `linf`: root mean square and largest |delta| over all pixels and channels;
* `band a-b`: share of delta's spectral energy in the radial band [a, b) (`spectral.band_energy`,
  the bands the attackers `bandstop-ideal-a-b` remove, up to the pixels on an edge); `band 0.75+`
  includes the corners beyond radius 1, which `bandstop-ideal-0.75-1` removes too;
* `grey rms`: RMS of luma(delta), what survives a grayscale attacker (luma is linear);
* `class share`: share of delta's energy that is the mean delta of the image's class
  (sum_i |mean_{y_i}|^2 / sum_i |delta_i|^2): 1 for a class-wise code, ~1/n_per_class for noise;
  `class share <0.25`: the same for the band below 0.25 only;
* `code rank`: effective number of distinct class codes (`codes.code_rank`; at most classes - 1).

    python experiments/delta_analysis.py --data_dir DATA --subset 5000 \\
        --methods fuse=outputs/sweeps/cifar10_cpu/methods/fuse/protected ... --out table.md
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from fuse_lightning.codes import class_share, code_rank
from fuse_lightning.colour import luma
from fuse_lightning.data import CIFAR10DataModule
from fuse_lightning.spectral import band_energy, bandpass

EDGES = (0.0, 0.25, 0.5, 0.75, 1.0, math.sqrt(2) + 1e-6)


def load(data_dir: str, subset: int, protected_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    dm = CIFAR10DataModule(data_dir=data_dir, train_subset=subset, test_subset=100, protected_dir=protected_dir)
    dm.setup("fit")
    return dm.train_images, dm.train_labels


def analyse(clean: torch.Tensor, protected: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    delta = protected.double() - clean.double()
    shares = band_energy(delta, EDGES)
    low = bandpass(delta, 0.0, 0.25)
    row = {"rms": float(delta.pow(2).mean().sqrt()), "linf": float(delta.abs().max())}
    labels_ = ("band 0-0.25", "band 0.25-0.5", "band 0.5-0.75")
    row |= {label: float(s) for label, s in zip(labels_, shares[:3], strict=True)}
    row["band 0.75+"] = float(shares[3] + shares[4])  # with the corners beyond radius 1
    row["grey rms"] = float(luma(delta).pow(2).mean().sqrt())
    row["class share"] = class_share(delta, labels)
    row["class share <0.25"] = class_share(low, labels)
    row["code rank"] = code_rank(delta, labels)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--subset", type=int, default=5000)
    parser.add_argument("--methods", nargs="+", required=True, help="name=protected_dir pairs")
    parser.add_argument("--out", type=Path, help="markdown table (default: print)")
    args = parser.parse_args()
    clean, labels = load(args.data_dir, args.subset, None)
    rows = {}
    for pair in args.methods:
        name, _, directory = pair.partition("=")
        protected, plabels = load(args.data_dir, args.subset, directory)
        if not torch.equal(plabels, labels):
            raise SystemExit(f"{directory}: labels differ from the clean subset")
        rows[name] = analyse(clean, protected, labels)
    keys = list(next(iter(rows.values())))
    lines = ["| method | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
