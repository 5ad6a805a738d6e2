"""Clean test accuracy per epoch of a sweep's victims: when does a victim take the shortcut?

A sweep's table keeps each victim's final accuracy. Under some attackers (grayscale on class-wise
EM) a victim first learns real features and only some epochs later switches to the perturbation's
shortcut, or never does; the final number alone then looks like a seed's noise. This script reads
the per-epoch `val/acc` that Lightning's CSV logger wrote in each run dir of a sweep, writes them
to one CSV (committed, so the figure can be rebuilt without the work dir) and plots one panel per
victim architecture, one line per run, one colour per method.

    python experiments/training_curves.py outputs/sweeps/cifar10_standard_cpu --filter grayscale \\
        --out experiments/results/cifar10_standard_cpu/curves_grayscale
    python experiments/training_curves.py --from_csv experiments/results/cifar10_standard_cpu/curves_grayscale.csv \\
        --out experiments/results/cifar10_standard_cpu/curves_grayscale   # replot only

Run dirs are not kept forever; `--keep_rows` adds the runs found now to the CSV already at
<out>.csv and keeps the runs there whose dirs are gone (a run found again replaces its rows).
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from fuse_lightning.results import (
    atomic_write_text,
    collect_results,
    method_colors,
    pyplot,
    save_figure,
)

FIELDS = ("run_id", "method", "arch", "filter", "seed", "epoch", "val_acc")


def run_curve(run_dir: Path) -> dict[int, float]:
    """Epoch -> clean test accuracy of one run, from every `logs/version_*/metrics.csv`.

    A resumed run logs into a new version; later versions win for an epoch logged twice.
    """
    def version(path: Path) -> int:
        number = path.parent.name.removeprefix("version_")
        return int(number) if number.isdigit() else -1

    curve: dict[int, float] = {}
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv"), key=version):
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("val/acc") and row.get("epoch"):
                    curve[int(float(row["epoch"]))] = float(row["val/acc"])
    return curve


def collect(work_dir: Path, filter_name: str, methods: list[str] | None, archs: list[str] | None) -> list[dict]:
    """One row per (run, epoch) of the finished runs (those with a `result.json`) that match."""
    runs = work_dir / "runs"
    if not runs.is_dir():
        raise SystemExit(f"{work_dir}: no runs/ folder here; pass a sweep's work_dir (e.g. outputs/sweeps/<name>)")
    rows = []
    for result in collect_results(work_dir):
        if result["filter"] != filter_name:
            continue
        if (methods and result["method"] not in methods) or (archs and result["arch"] not in archs):
            continue
        parts = {k: result[k] for k in ("run_id", "method", "arch", "filter", "seed")}
        for epoch, acc in sorted(run_curve(runs / result["run_id"]).items()):
            rows.append({**parts, "epoch": epoch, "val_acc": acc})
    if not rows:
        raise SystemExit(f"{runs}: no run with filter {filter_name!r} has a logged val/acc "
                         f"(methods {methods or 'any'}, archs {archs or 'any'})")
    return rows


def write_rows(rows: list[dict], path: Path) -> Path:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row[k] for k in FIELDS} for row in rows)
    return atomic_write_text(path, out.getvalue())


def merge_rows(kept: list[dict], found: list[dict]) -> list[dict]:
    """`kept` (an earlier CSV's rows) without the runs in `found`, then `found`: one filter only."""
    filters = {r["filter"] for r in kept} | {r["filter"] for r in found}
    if len(filters) > 1:
        raise SystemExit(f"--keep_rows: the CSV and the runs found hold different filters {sorted(filters)}")
    found_ids = {r["run_id"] for r in found}
    return [r for r in kept if r["run_id"] not in found_ids] + found


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"{path}: no such curves CSV")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = [f for f in FIELDS if rows and f not in rows[0]]
    if not rows or missing:
        raise SystemExit(f"{path}: not a curves CSV (needs columns {', '.join(FIELDS)}; missing {missing or 'rows'})")
    return [{**r, "seed": int(r["seed"]), "epoch": int(r["epoch"]), "val_acc": float(r["val_acc"])} for r in rows]


def plot(rows: list[dict], path: Path, chance: float | None) -> Path:
    plt = pyplot()
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = method_colors(methods)
    styles = ["-", "--", ":", "-."]  # one per seed, so a seed's runs line up across methods
    fig, axes = plt.subplots(1, len(archs), figsize=(4.6 * len(archs), 3.6), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        for method in methods:
            for run_id in dict.fromkeys(r["run_id"] for r in rows if r["arch"] == arch and r["method"] == method):
                points = [r for r in rows if r["run_id"] == run_id]
                seed = points[0]["seed"]
                ax.plot([p["epoch"] + 1 for p in points], [100 * p["val_acc"] for p in points],
                        color=colors[method], linestyle=styles[seed % len(styles)], marker="o", markersize=3,
                        label=f"{method} s{seed}")
        if chance is not None:
            ax.axhline(100 * chance, color="gray", linestyle=(0, (2, 2)), linewidth=1)
        ax.set_title(f"{arch}, filter {rows[0]['filter']}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("clean test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work_dir", nargs="?", type=Path, help="a sweep's work_dir (holds runs/)")
    parser.add_argument("--filter", help="the attacker filter whose runs to plot, e.g. grayscale")
    parser.add_argument("--methods", nargs="*", help="only these methods (default: all)")
    parser.add_argument("--archs", nargs="*", help="only these victim architectures (default: all)")
    parser.add_argument("--from_csv", type=Path, help="replot a CSV this script wrote, instead of reading runs")
    parser.add_argument("--keep_rows", action="store_true",
                        help="keep the runs already in <out>.csv that are not found now (their dirs may be gone)")
    parser.add_argument("--chance", type=float, default=0.1, help="chance accuracy line (0.1 for 10 classes)")
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes <out>.csv and <out>.png")
    args = parser.parse_args(argv)
    if args.from_csv is not None:
        rows = read_rows(args.from_csv)
    elif args.work_dir is None or not args.filter:
        parser.error("give a sweep's work_dir and --filter, or --from_csv")
    else:
        rows = collect(args.work_dir, args.filter, args.methods, args.archs)
        csv_path = Path(f"{args.out}.csv")
        if args.keep_rows and csv_path.is_file():
            rows = merge_rows(read_rows(csv_path), rows)
        print(f"wrote {write_rows(rows, csv_path)}")
    print(f"wrote {plot(rows, Path(f'{args.out}.png'), args.chance)}")


if __name__ == "__main__":
    main()
