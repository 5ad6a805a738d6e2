"""Sweep results: collect `result.json` files, write a CSV, a markdown table and plots.

A result row is a dict as written by the sweep runner (`fuse_lightning.sweep`), with at least
`method`, `arch`, `filter`, `seed` and `val_acc` (clean test accuracy of the final epoch, as a
fraction). Only csv, numpy and matplotlib (Agg backend) are used; every file is written to a
temporary name and renamed, so an interrupted report never leaves a truncated file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RESULT_FIELDS",
    "aggregate",
    "atomic_write_bytes",
    "atomic_write_text",
    "band_of",
    "collect_results",
    "cutoff_of",
    "markdown_table",
    "plot_acc_vs_cutoff",
    "plot_band_map",
    "read_results",
    "write_csv",
    "write_report",
]

# Column order of results.csv; keys a row has beyond these are appended in sorted order.
RESULT_FIELDS = (
    "run_id",
    "method",
    "arch",
    "filter",
    "seed",
    "val_acc",
    "best_val_acc",
    "train_acc",
    "epochs",
    "num_classes",
    "wall_s",
    "protected_dir",
    "command",
)

_LOWPASS = re.compile(r"lowpass-([a-z]+\d*)-(\d+(?:\.\d*)?(?:e-?\d+)?)")
_BANDPASS = re.compile(r"bandpass-([a-z]+\d*)-(\d+(?:\.\d*)?(?:e-?\d+)?)-(\d+(?:\.\d*)?(?:e-?\d+)?)")


# --------------------------------------------------------------------------------------------
# Atomic writes and I/O
# --------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temporary sibling and `os.replace` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_results(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Load `result.json` files that exist, in the given order (missing ones are skipped)."""
    rows = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            rows.append(json.loads(p.read_text()))
    return rows


def collect_results(work_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every finished run of a sweep work directory: `<work_dir>/runs/*/result.json`, sorted by run id."""
    return read_results(sorted(Path(work_dir).glob("runs/*/result.json")))


def _csv_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return "" if value is None else value


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write result rows to a CSV file (known columns first, list values space-joined).

    Args:
        rows: Result dicts.
        path: Destination file.

    Returns:
        The written path.
    """
    extra = sorted({k for row in rows for k in row} - set(RESULT_FIELDS))
    fields = [f for f in RESULT_FIELDS if any(f in row for row in rows)] + extra
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in fields})
    return atomic_write_text(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def _ordered(values: Iterable[Any]) -> list[Any]:
    """Distinct values in order of first appearance."""
    return list(dict.fromkeys(values))


def aggregate(
    rows: Sequence[dict[str, Any]], key: str = "val_acc"
) -> dict[tuple[str, str, str], tuple[float, float, int]]:
    """Mean and standard deviation over seeds of `key`, in percent.

    Args:
        rows: Result dicts.
        key: Accuracy field (a fraction in [0, 1]).

    Returns:
        `{(arch, method, filter): (mean %, std %, number of seeds)}`; the std is the sample
        standard deviation (ddof=1), 0 for a single seed.
    """
    groups: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        value = row.get(key)
        if value is None or value == "":
            continue
        groups.setdefault((row["arch"], row["method"], row["filter"]), []).append(100.0 * float(value))
    out = {}
    for k, values in groups.items():
        arr = np.asarray(values, dtype=np.float64)
        std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
        out[k] = (float(arr.mean()), std, len(arr))
    return out


def markdown_table(
    rows: Sequence[dict[str, Any]],
    arch: str | None = None,
    methods: Sequence[str] | None = None,
    filters: Sequence[str] | None = None,
    key: str = "val_acc",
) -> str:
    """Accuracy table(s) in markdown: one row per method, one column per filter.

    Cells are "mean ± std" in percent over seeds, or the plain value when a cell has one seed;
    missing cells show "–". With several architectures and `arch=None`, one table per
    architecture is emitted under a `### <arch>` heading.

    Args:
        rows: Result dicts.
        arch: Only this architecture; None means all (one table each).
        methods: Row order; default is the order of first appearance in `rows`.
        filters: Column order; default is the order of first appearance in `rows`.
        key: Accuracy field to tabulate.

    Returns:
        Markdown text ending with a newline (empty string when there are no rows).
    """
    stats = aggregate(rows, key)
    archs = [arch] if arch is not None else _ordered(r["arch"] for r in rows)
    methods = list(methods) if methods is not None else _ordered(r["method"] for r in rows)
    filters = list(filters) if filters is not None else _ordered(r["filter"] for r in rows)
    blocks = []
    for a in archs:
        lines = []
        if arch is None and len(archs) > 1:
            lines += [f"### {a}", ""]
        lines.append("| method | " + " | ".join(filters) + " |")
        lines.append("|---|" + "---:|" * len(filters))
        for m in methods:
            cells = []
            for f in filters:
                if (a, m, f) not in stats:
                    cells.append("–")
                    continue
                mean, std, n = stats[(a, m, f)]
                cells.append(f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def cutoff_of(filter_name: str) -> tuple[str, float] | None:
    """`(kind, cutoff)` of a low-pass filter name; "none" counts as cutoff 1.0 (all frequencies kept).

    Returns None for filters that are not low-pass (jpeg, grayscale, band-pass, ...).
    """
    if filter_name == "none":
        return ("none", 1.0)
    if m := _LOWPASS.fullmatch(filter_name):
        return (m.group(1), float(m.group(2)))
    return None


def band_of(filter_name: str) -> tuple[float, float] | None:
    """`(low, high)` radii of a band-pass filter name such as "bandpass-ideal-0.25-0.5", else None."""
    if m := _BANDPASS.fullmatch(filter_name):
        return (float(m.group(2)), float(m.group(3)))
    return None


def _chance(rows: Sequence[dict[str, Any]]) -> float | None:
    classes = {int(r["num_classes"]) for r in rows if r.get("num_classes")}
    return 100.0 / classes.pop() if len(classes) == 1 else None


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def _panels(n: int, width: float = 4.2, height: float = 3.4):
    plt = _pyplot()
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return plt, fig, list(axes[0])


def plot_acc_vs_cutoff(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike, key: str = "val_acc"
) -> Path | None:
    """Clean test accuracy against the attacker's low-pass cutoff, one line per method.

    "none" is drawn at cutoff 1.0. One panel per architecture; the shaded band is ± one std
    over seeds; the dashed line is chance level (when `num_classes` is known from the rows).
    Low-pass filters of several kinds (ideal, gaussian, ...) get separate lines.

    Args:
        rows: Result dicts.
        path: Destination PNG.
        key: Accuracy field to plot.

    Returns:
        The written path, or None when no row has a low-pass (or "none") filter.
    """
    stats = aggregate(rows, key)
    points: dict[str, dict[tuple[str, str], list[tuple[float, float, float]]]] = {}
    parsed_all = [c for r in rows if (c := cutoff_of(r["filter"]))]
    kinds = {kind for kind, _ in parsed_all if kind != "none"}
    # "none" sits at cutoff 1.0, unless a real cutoff >= 1 is plotted (a Gaussian or Butterworth
    # cutoff of 1 still attenuates), in which case "none" moves to sqrt 2 to keep points apart.
    top = max((c for kind, c in parsed_all if kind != "none"), default=0.0)
    x_none = 1.0 if top < 1.0 else float(np.sqrt(2.0))
    for (arch, method, filt), (mean, std, _) in stats.items():
        parsed = cutoff_of(filt)
        if parsed is None:
            continue
        x = x_none if parsed[0] == "none" else parsed[1]
        # "none" belongs to every low-pass kind's curve.
        for kind in [parsed[0]] if parsed[0] != "none" else (sorted(kinds) or ["none"]):
            points.setdefault(arch, {}).setdefault((method, kind), []).append((x, mean, std))
    if not points:
        return None
    methods = _ordered(r["method"] for r in rows)
    archs = [a for a in _ordered(r["arch"] for r in rows) if a in points]
    chance = _chance(rows)
    plt, fig, axes = _panels(len(archs))
    for ax, arch in zip(axes, archs, strict=True):
        for method in methods:
            for kind in sorted({k for (m, k) in points[arch] if m == method}):
                xs, ys, ss = map(np.asarray, zip(*sorted(points[arch][(method, kind)]), strict=True))
                label = method if len(kinds) <= 1 else f"{method} ({kind})"
                (line,) = ax.plot(xs, ys, marker="o", label=label)
                if np.any(ss > 0):
                    ax.fill_between(xs, ys - ss, ys + ss, alpha=0.15, color=line.get_color())
        if chance is not None:
            ax.axhline(chance, linestyle="--", color="gray", linewidth=1, label="chance")
        ticks = sorted({p[0] for pts in points[arch].values() for p in pts})
        # Only "none" rows sit at x_none.
        ax.set_xticks(ticks, [("none" if t == x_none else f"{t:g}") for t in ticks], fontsize=7)
        ax.set_title(arch)
        ax.set_xlabel("low-pass cutoff (× Nyquist)")
        if ax is axes[0]:
            ax.set_ylabel("clean test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="best")
    path = _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_band_map(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike, key: str = "val_acc"
) -> Path | None:
    """Heatmap of accuracy when the attacker keeps one radial band: methods x bands.

    Bands come from "bandpass-<kind>-<low>-<high>" filter names, sorted by their lower radius;
    every cell is annotated with its mean accuracy (%). One panel per architecture.

    Args:
        rows: Result dicts.
        path: Destination PNG.
        key: Accuracy field to plot.

    Returns:
        The written path, or None when no row has a band-pass filter.
    """
    stats = aggregate(rows, key)
    band_rows = [r for r in rows if band_of(r["filter"]) is not None]
    if not band_rows:
        return None
    archs = _ordered(r["arch"] for r in band_rows)
    methods = _ordered(r["method"] for r in band_rows)
    filters = sorted(_ordered(r["filter"] for r in band_rows), key=band_of)
    labels = [f"{lo:g}–{hi:g}" for lo, hi in map(band_of, filters)]
    plt, fig, axes = _panels(len(archs), width=1.1 * len(filters) + 2.5, height=0.5 * len(methods) + 1.8)
    image = None
    for ax, arch in zip(axes, archs, strict=True):
        grid = np.full((len(methods), len(filters)), np.nan)
        for i, m in enumerate(methods):
            for j, f in enumerate(filters):
                if (arch, m, f) in stats:
                    grid[i, j] = stats[(arch, m, f)][0]
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for i in range(len(methods)):
            for j in range(len(filters)):
                if not np.isnan(grid[i, j]):
                    # Dark text on the bright end of viridis, light text elsewhere.
                    color = "black" if grid[i, j] > 60 else "white"
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color=color, fontsize=8)
        ax.set_xticks(range(len(filters)), labels)
        ax.set_yticks(range(len(methods)), methods)
        ax.set_xlabel("radial band kept (fraction of Nyquist)")
        ax.set_title(arch)
    fig.colorbar(image, ax=axes, label="test accuracy (%), test set in the same band")
    path = _save_figure(fig, path)
    plt.close(fig)
    return path


def write_report(
    rows: Sequence[dict[str, Any]],
    results_dir: str | os.PathLike,
    title: str,
    notes: str = "",
    methods: Sequence[str] | None = None,
    filters: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Write results.csv, table.md and the plots that apply into `results_dir`.

    Args:
        rows: Result dicts.
        results_dir: Destination directory.
        title: Heading of table.md.
        notes: Markdown paragraph placed under the heading.
        methods: Row order of the tables.
        filters: Column order of the tables.
        log: Called with one line per written file.

    Returns:
        `{"csv"|"table"|"acc_vs_cutoff"|"band_map": path}` for the files written.
    """
    results_dir = Path(results_dir)
    written = {"csv": write_csv(rows, results_dir / "results.csv")}
    text = f"# {title}\n\n" + (f"{notes.strip()}\n\n" if notes.strip() else "")
    text += markdown_table(rows, methods=methods, filters=filters) if rows else "No finished runs yet.\n"
    written["table"] = atomic_write_text(results_dir / "table.md", text)
    if rows:
        if p := plot_acc_vs_cutoff(rows, results_dir / "acc_vs_cutoff.png"):
            written["acc_vs_cutoff"] = p
        if p := plot_band_map(rows, results_dir / "band_map.png"):
            written["band_map"] = p
    if log is not None:
        for p in written.values():
            log(f"wrote {p}")
    return written
