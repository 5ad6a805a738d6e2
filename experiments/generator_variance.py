"""Variants over separately trained generators: mean ± std over generators, Welch intervals.

A sweep's table averages over victim seeds, which measures one protected set. A claim about a
FUSE *variant* must average over generator trainings too, which live in different methods (and
often different sweeps). This script reads the sweeps' `results.csv` files, takes one victim
seed per generator (the same for all, so each generator counts once and alike), and writes:

* per variant and attacker filter: mean ± std over generators, with each generator's value;
* per `compare` pair: the difference of the means with a 95 % Welch t interval
  (`fuse_lightning.results.welch_difference`: generators are independent, not paired).

    python experiments/generator_variance.py experiments/generator_variance.yaml \\
        --out experiments/results/generators_cpu/generator_variance.md

The spec (YAML): `victim_seed`, `filters`, `variants: {name: [{results, method}, ...]}` and
`compare: [[a, b], ...]`; see `experiments/generator_variance.yaml`.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np
import yaml

from fuse_lightning.results import atomic_write_text, welch_difference


def load_spec(path: str) -> dict:
    spec = yaml.safe_load(Path(path).read_text())
    for key in ("filters", "variants"):
        if key not in spec:
            raise SystemExit(f"{path}: missing `{key}`")
    for a, b in spec.get("compare", []):
        for name in (a, b):
            if name not in spec["variants"]:
                raise SystemExit(f"{path}: compare names {name!r}, which is not under `variants`")
    return spec


def values(spec: dict) -> dict[str, dict[str, list[float | None]]]:
    """`{variant: {filter: [accuracy % of each generator, None where it has no run]}}`."""
    seed = int(spec.get("victim_seed", 0))
    cache: dict[str, list[dict]] = {}
    out: dict[str, dict[str, list[float | None]]] = {}
    for variant, generators in spec["variants"].items():
        out[variant] = {f: [] for f in spec["filters"]}
        for gen in generators:
            if gen["results"] not in cache:
                if not Path(gen["results"]).is_file():
                    raise SystemExit(f"variant {variant!r}: no results file {gen['results']}")
                with open(gen["results"], newline="") as f:
                    cache[gen["results"]] = list(csv.DictReader(f))
            rows = {r["filter"]: 100.0 * float(r["val_acc"]) for r in cache[gen["results"]]
                    if r["method"] == gen["method"] and int(r["seed"]) == seed and r.get("val_acc") not in (None, "")}
            for f in spec["filters"]:
                out[variant][f].append(rows.get(f))
    return out


def report(spec: dict, table: dict[str, dict[str, list[float | None]]]) -> str:
    filters = spec["filters"]
    lines = [f"Clean test accuracy, %, victim seed {spec.get('victim_seed', 0)}; mean ± std over "
             "generators (n), each generator's value in brackets.", "",
             "| variant | " + " | ".join(filters) + " |", "|---|" + "---:|" * len(filters)]
    for variant, by_filter in table.items():
        cells = []
        for f in filters:
            got = [v for v in by_filter[f] if v is not None]
            if not got:
                cells.append("–")
                continue
            std = f" ± {np.std(got, ddof=1):.1f}" if len(got) > 1 else ""
            each = ", ".join("–" if v is None else f"{v:.1f}" for v in by_filter[f])
            cells.append(f"{np.mean(got):.1f}{std} ({len(got)}) [{each}]")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    if spec.get("compare"):
        lines += ["", "Differences of means over generators, points, 95 % Welch t interval "
                  "(`*`: the interval excludes 0):", "",
                  "| filter | " + " | ".join(f"{a} − {b}" for a, b in spec["compare"]) + " |",
                  "|---|" + "---:|" * len(spec["compare"])]
        for f in filters:
            cells = []
            for a, b in spec["compare"]:
                xa = [v for v in table[a][f] if v is not None]
                xb = [v for v in table[b][f] if v is not None]
                if not xa or not xb:
                    cells.append("–")
                    continue
                d, lo, hi = welch_difference(xa, xb)
                if math.isnan(lo):
                    cells.append(f"{d:+.1f} (n={len(xa)},{len(xb)})")
                else:
                    star = "*" if lo > 0 or hi < 0 else ""
                    cells.append(f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]{star}")
            lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="YAML spec (see experiments/generator_variance.yaml)")
    parser.add_argument("--out", help="write the markdown here (default: print it)")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    text = report(spec, values(spec))
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
