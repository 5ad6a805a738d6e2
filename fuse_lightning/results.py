"""Sweep results: collect `result.json` files, write a CSV, a markdown table and plots.

A result row is a dict as written by the sweep runner (`fuse_lightning.sweep`), with at least
`method`, `arch`, `filter`, `seed` and `val_acc` (clean test accuracy of the final epoch, as a
fraction). Only csv, numpy, scipy (Student's t) and matplotlib (Agg backend) are used; filter names
are read with `fuse_lightning.filters.parse_filter_name` (imported when first needed). Every
file is written to a temporary name and renamed, so an interrupted report never leaves a
truncated file.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RESULT_FIELDS",
    "TEXT_COLUMNS",
    "aggregate",
    "atomic_write_bytes",
    "atomic_write_text",
    "band_of",
    "collect_results",
    "cutoff_of",
    "differences_table",
    "earlier_makings",
    "independent_differences",
    "independent_table",
    "makings_table",
    "markdown_table",
    "method_colors",
    "paired_differences",
    "plot_acc_vs_cutoff",
    "plot_band_map",
    "plot_set_means",
    "protected_sets_table",
    "read_csv_rows",
    "read_results",
    "set_groups",
    "set_means",
    "spec_of",
    "stopband_of",
    "write_csv",
    "usual_seed_count",
    "welch_difference",
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
    "protected_fingerprint",
    "command",
)

# Families drawn on the cutoff axis, in legend order, with their line style and marker.
_CUTOFF_STYLES = (("ideal", "-", "o"), ("gaussian", "--", "s"), ("butterworth", ":", "^"))


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


def _csv_cell(text: str) -> Any:
    """A CSV cell read back: '' is None, numbers become int or float, the rest stays text."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# Result columns kept as text when a CSV is read back; the others become numbers. A fingerprint
# is hex text: "1e10000000000000" must not become a float.
TEXT_COLUMNS = frozenset({"run_id", "method", "arch", "filter", "protected_dir", "protected_fingerprint", "command",
                          "data_dir", "run_key"})


def read_csv_rows(path: str | os.PathLike, text_columns: Iterable[str] = TEXT_COLUMNS) -> list[dict[str, Any]]:
    """Rows of a results CSV (csv only: nothing in the file is executed), numbers converted except
    in `text_columns`; [] when the file does not exist. Raises ValueError naming an unreadable file."""
    path = Path(path)
    if not path.is_file():
        return []
    text_columns = frozenset(text_columns)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: cannot read ({err}); repair or move the file") from err
    return [{k: (v or None) if k in text_columns else _csv_cell(v) for k, v in row.items() if k is not None}
            for row in rows]


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
    a cell with another number of seeds than most cells (`usual_seed_count`) adds `(n=k)`;
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
    usual_n = _usual_count(stats)
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
                cell = f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"
                cells.append(cell if n == usual_n else f"{cell} (n={n})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def usual_seed_count(rows: Sequence[dict[str, Any]], key: str = "val_acc") -> int:
    """The most common number of seeds per (arch, method, filter) cell (0 without rows)."""
    return _usual_count(aggregate(rows, key))


def _usual_count(stats: dict[tuple[str, str, str], tuple[float, float, int]]) -> int:
    counts = [n for _, _, n in stats.values()]
    return max(set(counts), key=counts.count) if counts else 0


def paired_differences(
    rows: Sequence[dict[str, Any]], a: str, b: str, key: str = "val_acc", confidence: float = 0.95
) -> dict[tuple[str, str], tuple[float, float, float, int]]:
    """Method `a` minus method `b`, paired by victim seed, per (arch, filter), in points.

    Pairs are runs of the two methods with the same architecture, filter and victim seed (the
    same initialisation and data order, different training set). The interval is Student's t
    on the paired differences: `mean ± t(1 - (1 - confidence)/2, n - 1) * sd / sqrt(n)`;
    with one pair it is undefined (NaN).

    Returns:
        `{(arch, filter): (mean difference, low, high, number of pairs)}`.
    """
    from scipy import stats as st

    value: dict[tuple[str, str, str, Any], float] = {}
    for row in rows:
        if row.get(key) not in (None, ""):
            value[(row["method"], row["arch"], row["filter"], row["seed"])] = 100.0 * float(row[key])
    diffs: dict[tuple[str, str], list[float]] = {}
    for (method, arch, filt, seed), v in value.items():
        if method == a and (b, arch, filt, seed) in value:
            diffs.setdefault((arch, filt), []).append(v - value[(b, arch, filt, seed)])
    out = {}
    for k, d in diffs.items():
        arr = np.asarray(d, dtype=np.float64)
        mean, n = float(arr.mean()), len(arr)
        if n > 1:
            half = float(st.t.ppf(0.5 + confidence / 2, n - 1) * arr.std(ddof=1) / np.sqrt(n))
        else:
            half = float("nan")
        out[k] = (mean, mean - half, mean + half, n)
    return out


def welch_difference(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """mean(a) − mean(b) with Welch's t interval, for independent samples (e.g. accuracies of
    separately trained generators, which cannot be paired): scipy's unequal-variance t-test,
    `ttest_ind(a, b, equal_var=False).confidence_interval(confidence)`. The bounds are NaN
    unless both samples have ≥ 2 values.

    Returns:
        `(difference, low, high)` in the samples' units.
    """
    from scipy import stats as st

    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.size == 0 or xb.size == 0:
        raise ValueError("welch_difference needs at least one value in each sample")
    diff = float(xa.mean() - xb.mean())
    if xa.size < 2 or xb.size < 2:
        return diff, float("nan"), float("nan")
    if xa.var() == 0 and xb.var() == 0:  # scipy gives NaN; the difference is exact
        return diff, diff, diff
    ci = st.ttest_ind(xa, xb, equal_var=False).confidence_interval(confidence)
    return diff, float(ci.low), float(ci.high)


def differences_table(
    rows: Sequence[dict[str, Any]], pairs: Sequence[Sequence[str]], filters: Sequence[str] | None = None,
    key: str = "val_acc",
) -> str:
    """Markdown: for each pair `[a, b]`, the paired difference a − b per filter with its 95 % CI.

    One row per filter, one column per pair (and architecture, when there are several); a cell
    is `mean [low, high] (n)` in points, `*` when the interval excludes 0. Empty string when no
    pair has a matched run.
    """
    filters = list(filters) if filters is not None else _ordered(r["filter"] for r in rows)
    archs = _ordered(r["arch"] for r in rows)
    columns = []
    for a, b in pairs:
        diffs = paired_differences(rows, a, b, key)
        for arch in archs:
            if any((arch, f) in diffs for f in filters):
                label = f"{a} − {b}" + (f" ({arch})" if len(archs) > 1 else "")
                columns.append((label, {f: diffs.get((arch, f)) for f in filters}))
    return _filter_table(columns, filters, lambda d: _difference_cell(d[:3], d[3] > 1, f"{d[3]}"))


def independent_differences(
    rows: Sequence[dict[str, Any]], a: Sequence[str], b: Sequence[str], key: str = "val_acc",
    confidence: float = 0.95,
) -> dict[tuple[str, str], tuple[float, float, float, int, int]]:
    """Methods `a` minus methods `b` as independent samples, per (arch, filter), in points.

    Every run of a method in `a` (or `b`) is one sample, whatever its victim seed: this is the
    comparison for protected sets that cannot be paired, e.g. `a = [fuse, fuse_g1]`, two
    separately trained generators, against `b = [em_classwise]`. The interval is Welch's
    (`welch_difference`), NaN unless both sides have ≥ 2 runs. Runs of one generator share its
    protected set, so with few generators the interval may understate the variance of making a
    set again; the table says how many runs each side has.

    Returns:
        `{(arch, filter): (mean difference, low, high, runs of a, runs of b)}`.
    """
    samples: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for row in rows:
        if row.get(key) in (None, ""):
            continue
        side = 0 if row["method"] in a else 1 if row["method"] in b else None
        if side is not None:
            samples.setdefault((row["arch"], row["filter"]), ([], []))[side].append(100.0 * float(row[key]))
    out = {}
    for k, (xa, xb) in samples.items():
        if xa and xb:
            out[k] = (*welch_difference(xa, xb, confidence), len(xa), len(xb))
    return out


def independent_table(
    rows: Sequence[dict[str, Any]], comparisons: Sequence[tuple[str, Sequence[str], str, Sequence[str]]],
    filters: Sequence[str] | None = None, key: str = "val_acc",
) -> str:
    """Markdown: for each `(label a, methods a, label b, methods b)`, the Welch difference a − b per
    filter (`independent_differences`). A cell is `mean [low, high] (runs a, runs b)` in points,
    `*` when the interval excludes 0; without an interval (a side with one run) just
    `mean (runs a, runs b)`. Empty string when no comparison has runs on both sides.
    """
    filters = list(filters) if filters is not None else _ordered(r["filter"] for r in rows)
    archs = _ordered(r["arch"] for r in rows)
    columns = []
    for label_a, a, label_b, b in comparisons:
        diffs = independent_differences(rows, a, b, key)
        for arch in archs:
            if any((arch, f) in diffs for f in filters):
                label = f"{label_a} − {label_b}" + (f" ({arch})" if len(archs) > 1 else "")
                columns.append((label, {f: diffs.get((arch, f)) for f in filters}))
    return _filter_table(columns, filters,
                         lambda d: _difference_cell(d[:3], not np.isnan(d[1]), f"{d[3]}, {d[4]}"))


def protected_sets_table(rows: Sequence[dict[str, Any]], methods: Sequence[str] | None = None) -> str:
    """Markdown table of the protected sets each method's victims trained on, by fingerprint.

    One row per method with at least one recorded `protected_fingerprint`: the number of distinct
    sets and the runs on each (`unrecorded`: runs from before fingerprints were recorded). More
    than one set means the set was made again and differs, so spread across its runs holds the
    variance of making the set as well as that of training the victim. '' when nothing is recorded.
    """
    runs_per_set: dict[str, Counter] = {}  # method -> {fingerprint (None: unrecorded): runs}
    for row in rows:
        runs_per_set.setdefault(str(row.get("method")), Counter())[row.get("protected_fingerprint") or None] += 1
    listed = [m for m in methods or () if m in runs_per_set]
    lines = []
    for method in listed + [m for m in runs_per_set if m not in listed]:
        counts = runs_per_set[method]
        recorded = [f for f in counts if f is not None]
        if not recorded:
            continue
        cells = ", ".join(f"`{f}`: {counts[f]}" for f in recorded)
        if None in counts:
            cells += f", unrecorded: {counts[None]}"
        lines.append(f"| {method} | {len(recorded)} | {cells} |")
    if not lines:
        return ""
    return "| method | sets recorded | victim runs per set |\n|---|---:|---|\n" + "\n".join(lines) + "\n"


def earlier_makings(rows: Sequence[dict[str, Any]], superseded: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The superseded rows of runs repeated on a set made again: a current row has the run id and
    the victim command, with another `protected_fingerprint` (the same victim, another set)."""
    current = {r["run_id"]: r for r in rows if r.get("run_id")}
    return [s for s in superseded
            if (r := current.get(s.get("run_id"))) is not None and s.get("command") == r.get("command")
            and s.get("protected_fingerprint") and r.get("protected_fingerprint")
            and s["protected_fingerprint"] != r["protected_fingerprint"]]


def set_means(rows: Sequence[dict[str, Any]], key: str = "val_acc") -> list[dict[str, Any]]:
    """One row per protected set: `key` averaged over the victims of each (arch, method, filter,
    `protected_fingerprint`), so a set counts once however many victim seeds trained on it. Rows
    without a fingerprint (clean data: nothing made, nothing to vary) stay one sample per run."""
    groups: dict[tuple[Any, ...], list[float]] = {}
    out = []
    for row in rows:
        if row.get(key) in (None, ""):
            continue
        if not row.get("protected_fingerprint"):
            out.append(row)
            continue
        groups.setdefault((row["arch"], row["method"], row["filter"], row["protected_fingerprint"]),
                          []).append(float(row[key]))
    for (arch, method, filter_name, fingerprint), values in groups.items():
        out.append({"arch": arch, "method": method, "filter": filter_name, "protected_fingerprint": fingerprint,
                    key: float(np.mean(values))})
    return out


def _group_labels(groups: Sequence[tuple[str, Sequence[str]]]) -> dict[str, str]:
    """Method -> the label of the first group that holds it."""
    label_of: dict[str, str] = {}
    for label, methods in groups:
        for m in methods:
            label_of.setdefault(m, label)
    return label_of


def set_groups(rows: Sequence[dict[str, Any]], groups: Sequence[tuple[str, Sequence[str]]] = (),
               key: str = "val_acc") -> dict[tuple[str, str, str], list[float]]:
    """Accuracy (%) of each protected set, gathered per (arch, group, filter) for `plot_set_means`.

    Args:
        rows: Result dicts, usually `set_means` rows: one per protected set (every making of it),
            one per run for clean data.
        groups: `(label, methods)` whose sets are drawn together (a pool of separately made sets,
            e.g. three generators); a method in no group is its own group.
        key: Accuracy field (a fraction).

    Returns:
        `{(arch, label, filter): [value in %, ...]}`, in order of first appearance in `rows`.
    """
    label_of = _group_labels(groups)
    out: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        if r.get(key) in (None, ""):
            continue
        out.setdefault((r["arch"], label_of.get(r["method"], r["method"]), r["filter"]), []).append(
            100.0 * float(r[key]))
    return out


def makings_table(rows: Sequence[dict[str, Any]], superseded: Sequence[dict[str, Any]],
                  methods: Sequence[str] | None = None, filters: Sequence[str] | None = None) -> str:
    """Markdown table of accuracy per protected set, for methods whose set was made again.

    A superseded row (one that left results.csv, `results_superseded.csv`) counts when a current
    row has its run id and its victim command but another `protected_fingerprint`: the same
    victim, trained on a set made again that came out different. For every (arch, method) with
    two or more sets among those rows and the current ones, one line per set (current sets first)
    gives mean ± std (n) per filter, so the variance of making a set again is seen beside that of
    training the victim. '' when no method has two sets.
    """
    earlier = earlier_makings(rows, superseded)
    if not earlier:
        return ""
    pool = [r for r in rows if r.get("protected_fingerprint")] + earlier
    now = {(r["arch"], r["method"], r["protected_fingerprint"]) for r in rows if r.get("protected_fingerprint")}
    values: dict[tuple[str, str], dict[str, dict[str, list[float]]]] = {}  # (arch, method) -> set -> filter -> %
    for r in pool:
        if r.get("val_acc") is None:
            continue
        by_set = values.setdefault((r["arch"], r["method"]), {})
        by_set.setdefault(r["protected_fingerprint"], {}).setdefault(r["filter"], []).append(100.0 * float(r["val_acc"]))
    filters = list(filters) if filters else _ordered(r["filter"] for r in pool)
    order = {m: i for i, m in enumerate(methods or ())}
    archs = _ordered(r["arch"] for r in pool)
    keys = sorted((k for k in values if len(values[k]) > 1),
                  key=lambda k: (archs.index(k[0]), order.get(k[1], len(order)), k[1]))
    if not keys:
        return ""
    lines = ["| victim | method | set | " + " | ".join(filters) + " |", "|---|---|---|" + "---:|" * len(filters)]
    for arch, method in keys:
        by_set = values[(arch, method)]
        for fingerprint in sorted(by_set, key=lambda f: ((arch, method, f) not in now, f)):
            cells = []
            for f in filters:
                v = np.asarray(by_set[fingerprint].get(f, []), dtype=np.float64)
                cells.append("–" if not len(v) else f"{v.mean():.1f}" + (
                    f" ± {v.std(ddof=1):.1f} (n={len(v)})" if len(v) > 1 else " (n=1)"))
            label = f"`{fingerprint}`" + (" (in results.csv)" if (arch, method, fingerprint) in now else " (superseded)")
            lines.append(f"| {arch} | {method} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _difference_cell(d: Sequence[float], with_interval: bool, count: str) -> str:
    """`mean [low, high]* (count)` in points (`*`: the interval excludes 0), or `mean (count)`."""
    if not with_interval:
        return f"{d[0]:+.1f} ({count})"
    star = "*" if d[1] > 0 or d[2] < 0 else ""
    return f"{d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]{star} ({count})"


def _filter_table(columns: Sequence[tuple[str, dict[str, Any]]], filters: Sequence[str],
                  cell: Callable[[Any], str]) -> str:
    """Markdown with one row per filter and one column per `(label, {filter: value or None})`;
    `–` where a value is None. Empty string without columns."""
    if not columns:
        return ""
    lines = ["| filter | " + " | ".join(label for label, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for f in filters:
        cells = ["–" if by_filter[f] is None else cell(by_filter[f]) for _, by_filter in columns]
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def spec_of(filter_name: str) -> Any:
    """The parsed `FilterSpec` of a filter name, or None when the name is not a known filter."""
    from fuse_lightning.filters import parse_filter_name

    try:
        return parse_filter_name(filter_name)
    except ValueError:
        return None


def cutoff_of(filter_name: str) -> tuple[str, float] | None:
    """`(family, cutoff)` of a low-pass filter name, for the accuracy-vs-cutoff plot.

    The family is the kind as written in the name (`ideal`, `gaussian`, `butterworth`,
    `butterworth4`, ...). "none" counts as `("none", 1.0)` (all frequencies kept).

    Returns None for filters that are not low-pass (jpeg, grayscale, band-pass, blur, unknown...).
    """
    spec = spec_of(filter_name)
    if spec is None:
        return None
    if spec.family == "none":
        return ("none", 1.0)
    if spec.family == "lowpass":
        return (spec.kind_token, spec.cutoff)
    return None


def band_of(filter_name: str) -> tuple[float, float] | None:
    """`(low, high)` radii of a band-pass filter name such as "bandpass-ideal-0.25-0.5", else None."""
    spec = spec_of(filter_name)
    return spec.band if spec is not None and spec.family == "bandpass" else None


def stopband_of(filter_name: str) -> tuple[float, float] | None:
    """`(low, high)` radii removed by a band-stop filter name ("bandstop-ideal-0.25-0.5"), else None."""
    spec = spec_of(filter_name)
    return spec.band if spec is not None and spec.family == "bandstop" else None


def _chance(rows: Sequence[dict[str, Any]]) -> float | None:
    classes = {int(r["num_classes"]) for r in rows if r.get("num_classes")}
    return 100.0 / classes.pop() if len(classes) == 1 else None


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write a figure as PNG through a temporary file and a rename (never a half-written plot)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def _panels(n: int, width: float = 4.2, height: float = 3.4):
    plt = pyplot()
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return plt, fig, list(axes[0])


def _family_order(family: str) -> tuple[int, str]:
    names = [name for name, _, _ in _CUTOFF_STYLES]
    base = "butterworth" if family.startswith("butterworth") else family
    return (names.index(base) if base in names else len(names), family)


def _family_styles(families: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """Line style and marker per low-pass family; Butterworth orders get distinct styles."""
    table = {name: (ls, mk) for name, ls, mk in _CUTOFF_STYLES}
    spare = itertools.cycle([((0, (5, 1, 1, 1)), "v"), ((0, (1, 1)), "P"), ((0, (3, 1, 1, 1, 1, 1)), "X")])
    styles: dict[str, tuple[Any, str]] = {}
    for fam in sorted(families, key=_family_order):
        style = table.get(fam)
        styles[fam] = style if style is not None and style not in styles.values() else next(spare)
    return styles


def _cutoff_points(
    rows: Sequence[dict[str, Any]], key: str
) -> tuple[dict[str, dict[tuple[str, str], list[tuple[float, float, float]]]], list[str], float]:
    """(arch -> (method, low-pass family) -> [(cutoff, mean, std)], the families, x of "none")."""
    stats = aggregate(rows, key)
    points: dict[str, dict[tuple[str, str], list[tuple[float, float, float]]]] = {}
    parsed_all = [c for r in rows if (c := cutoff_of(r["filter"]))]
    families = sorted({fam for fam, _ in parsed_all if fam != "none"}, key=_family_order)
    # "none" sits at cutoff 1.0, unless a real cutoff >= 1 is plotted (a Gaussian or Butterworth
    # cutoff of 1 still attenuates), in which case "none" moves to sqrt 2 to keep points apart.
    top = max((c for fam, c in parsed_all if fam != "none"), default=0.0)
    x_none = 1.0 if top < 1.0 else float(np.sqrt(2.0))
    for (arch, method, filt), (mean, std, _) in stats.items():
        parsed = cutoff_of(filt)
        if parsed is None:
            continue
        x = x_none if parsed[0] == "none" else parsed[1]
        for fam in [parsed[0]] if parsed[0] != "none" else (families or ["none"]):
            points.setdefault(arch, {}).setdefault((method, fam), []).append((x, mean, std))
    return points, families, x_none


def method_colors(methods: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """One RGBA color per method, all distinct for up to 20 methods.

    Up to 10 methods get matplotlib's default cycle (tab10). Beyond that tab10 would repeat (the
    11th method in the first one's color), so tab20 is used, its dark shades first and its light
    shades after. Past 20 methods colors repeat.
    """
    import matplotlib

    if len(methods) <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return {m: cmap(i) for i, m in enumerate(methods)}
    cmap = matplotlib.colormaps["tab20"]
    # tab20 pairs each hue as (dark, light) at indices (2k, 2k + 1): darks first, then lights.
    order = [2 * k for k in range(10)] + [2 * k + 1 for k in range(10)]
    return {m: cmap(order[i % 20]) for i, m in enumerate(methods)}


def plot_acc_vs_cutoff(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike, key: str = "val_acc"
) -> Path | None:
    """Clean test accuracy against the attacker's low-pass cutoff, one line per method and family.

    "none" is drawn at cutoff 1.0 and belongs to every family's line. One panel per
    architecture; the shaded band is ± one std over seeds; the dashed gray line is chance level
    (when `num_classes` is known from the rows). Each low-pass family present (ideal, gaussian,
    butterworth, butterworth<order>) gets its own line: the color is the method, the line style
    the family.

    Args:
        rows: Result dicts.
        path: Destination PNG.
        key: Accuracy field to plot.

    Returns:
        The written path, or None when no row has a low-pass (or "none") filter.
    """
    points, families, x_none = _cutoff_points(rows, key)
    if not points:
        return None
    methods = _ordered(r["method"] for r in rows)
    archs = [a for a in _ordered(r["arch"] for r in rows) if a in points]
    colors = method_colors(methods)
    styles = _family_styles(families or ["none"])
    styles.setdefault("none", ("-", "o"))
    several = len(families) > 1
    chance = _chance(rows)
    plt, fig, axes = _panels(len(archs))
    from matplotlib.lines import Line2D

    for ax, arch in zip(axes, archs, strict=True):
        for method in methods:
            for fam in sorted({f for (m, f) in points[arch] if m == method}, key=_family_order):
                xs, ys, ss = map(np.asarray, zip(*sorted(points[arch][(method, fam)]), strict=True))
                linestyle, marker = styles[fam]
                ax.plot(xs, ys, color=colors[method], linestyle=linestyle, marker=marker,
                        markersize=4, label=method)
                if np.any(ss > 0):
                    ax.fill_between(xs, ys - ss, ys + ss, alpha=0.06 if several else 0.15,
                                    color=colors[method])
        if chance is not None:
            ax.axhline(chance, linestyle="--", color="gray", linewidth=1)
        # One tick per distinct label (a blur's equivalent cutoff may nearly equal a real one);
        # only "none" rows sit at x_none.
        labels = {("none" if t == x_none else f"{t:.3g}"): t
                  for t in sorted({p[0] for pts in points[arch].values() for p in pts}, reverse=True)}
        ax.set_xticks(list(labels.values()), list(labels), fontsize=7,
                      rotation=45 if len(labels) > 8 else 0)
        ax.set_title(arch)
        soft = any(f not in ("ideal", "none") for f in families)
        xlabel = "low-pass cutoff (× Nyquist" + ("; soft kinds: gain ½ there)" if soft else ")")
        ax.set_xlabel(xlabel, fontsize=8)
        if ax is axes[0]:
            ax.set_ylabel("clean test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    present = [m for m in methods if any(m == k[0] for pts in points.values() for k in pts)]
    handles = [Line2D([], [], color=colors[m], marker="o", markersize=4, label=m) for m in present]
    if several:
        handles += [Line2D([], [], color="black", linestyle=styles[f][0], marker=styles[f][1],
                           markersize=4, label=f) for f in families]
    if chance is not None:
        handles.append(Line2D([], [], color="gray", linestyle="--", linewidth=1, label="chance"))
    # Outside the panels, so that no curve is hidden.
    axes[-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def plot_set_means(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    groups: Sequence[tuple[str, Sequence[str]]] = (),
    filters: Sequence[str] | None = None,
    key: str = "val_acc",
) -> Path | None:
    """One dot per protected set (its victims' mean), grouped by method or pool, per filter.

    What the set-level intervals summarise, drawn: how far apart separately made sets of one
    method land, beside the other methods' sets and the clean runs (hollow: one dot per run, as
    nothing was made). A short bar marks each group's mean. One panel per architecture.

    Args:
        rows: `set_means` rows.
        path: Destination PNG.
        groups: `(label, methods)` drawn as one group (`set_groups`).
        filters: Column order; default: order of first appearance.
        key: Accuracy field.

    Returns:
        The written path, or None without rows.
    """
    points = set_groups(rows, groups, key)
    if not points:
        return None
    archs = _ordered(a for a, _, _ in points)
    labels = _ordered(g for _, g, _ in points)
    filters = [f for f in (filters or _ordered(f for _, _, f in points)) if any(k[2] == f for k in points)]
    label_of = _group_labels(groups)
    made = {label_of.get(r["method"], r["method"]) for r in rows if r.get("protected_fingerprint")}
    colors = method_colors(labels)
    chance = _chance(rows)
    plt, fig, axes = _panels(len(archs), width=0.6 * len(filters) * max(1.0, len(labels) / 4) + 1.5, height=3.6)
    width = 0.8 / len(labels)  # the groups side by side within a filter's slot
    rng = np.random.default_rng(0)  # a fixed jitter, so a redrawn report is the same picture
    for ax, arch in zip(axes, archs, strict=True):
        for j, label in enumerate(labels):
            for i, f in enumerate(filters):
                values = np.asarray(points.get((arch, label, f), []))
                if not len(values):
                    continue
                x = i - 0.4 + width * (j + 0.5)
                jitter = rng.uniform(-0.25, 0.25, len(values)) * width
                ax.scatter(x + jitter, values, s=14, zorder=3, label=label if i == 0 else None,
                           color=colors[label] if label in made else "none", edgecolors=colors[label])
                ax.hlines(values.mean(), x - 0.4 * width, x + 0.4 * width, color=colors[label], linewidth=1.5)
        if chance is not None:
            ax.axhline(chance, linestyle="--", color="gray", linewidth=1)
        for i in range(1, len(filters)):
            ax.axvline(i - 0.5, color="lightgray", linewidth=0.8)
        ax.set_xticks(range(len(filters)), filters, fontsize=7, rotation=20)
        ax.set_xlim(-0.5, len(filters) - 0.5)
        ax.set_ylim(0, 100)
        ax.set_title(arch)
        if ax is axes[0]:
            ax.set_ylabel("clean test accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    legend: dict[str, Any] = {}  # label -> its first handle, over all panels
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(name, handle)
    title = "filled: one set\nhollow: one run" + ("\ndashed: chance" if chance is not None else "")
    axes[-1].legend(list(legend.values()), list(legend), fontsize=7, loc="upper left",
                    bbox_to_anchor=(1.02, 1.0), title=title, title_fontsize=7)
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def plot_band_map(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    key: str = "val_acc",
    family: str = "bandpass",
) -> Path | None:
    """Heatmap of accuracy when the attacker keeps (or removes) one radial band: methods x bands.

    With `family="bandpass"` the bands come from "bandpass-<kind>-<low>-<high>" filters (the band
    kept); with `family="bandstop"` from "bandstop-<kind>-<low>-<high>" filters (the band
    removed). Bands are sorted by their radii; when several kinds are present the kind is part of
    the column label. Every cell is annotated with its mean accuracy (%). One panel per
    architecture.

    Args:
        rows: Result dicts.
        path: Destination PNG.
        key: Accuracy field to plot.
        family: "bandpass" or "bandstop".

    Returns:
        The written path, or None when no row has a filter of that family.
    """
    if family not in ("bandpass", "bandstop"):
        raise ValueError(f"family must be 'bandpass' or 'bandstop', got {family!r}")
    stats = aggregate(rows, key)
    specs = {}
    for r in rows:
        spec = spec_of(r["filter"])
        if spec is not None and spec.family == family:
            specs[r["filter"]] = spec
    if not specs:
        return None
    band_rows = [r for r in rows if r["filter"] in specs]
    archs = _ordered(r["arch"] for r in band_rows)
    methods = _ordered(r["method"] for r in band_rows)
    filters = sorted(specs, key=lambda f: (specs[f].band, _family_order(specs[f].kind_token)))
    mixed = len({specs[f].kind_token for f in filters}) > 1
    labels = [(f"{specs[f].kind_token}\n" if mixed else "") + "{:g}–{:g}".format(*specs[f].band)
              for f in filters]
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
        ax.set_xticks(range(len(filters)), labels, fontsize=8)
        ax.set_yticks(range(len(methods)), methods)
        what = "kept" if family == "bandpass" else "removed"
        ax.set_xlabel(f"radial band {what} (fraction of Nyquist)")
        ax.set_title(arch if family == "bandpass" else f"{arch}: band removed by the attacker")
    label = ("test accuracy (%), test set in the same band" if family == "bandpass"
             else "test accuracy (%)")
    fig.colorbar(image, ax=axes, label=label)
    path = save_figure(fig, path)
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
    pairs: Sequence[Sequence[str]] = (),
    independent: Sequence[tuple[str, Sequence[str], str, Sequence[str]]] = (),
    superseded: Sequence[dict[str, Any]] = (),
    pools: dict[str, Sequence[str]] | None = None,
) -> dict[str, Path]:
    """Write results.csv, table.md (accuracies, then paired differences) and plots into `results_dir`.

    Plots: `acc_vs_cutoff.png` (low-pass filters), `band_map.png` (band-pass
    filters), `bandstop_map.png` (band-stop filters), `set_means.png` (one dot per protected set,
    when a set was made again).

    Args:
        rows: Result dicts.
        results_dir: Destination directory.
        title: Heading of table.md.
        notes: Markdown paragraph placed under the heading.
        methods: Row order of the tables.
        filters: Column order of the tables.
        log: Called with one line per written file.
        pairs: `[a, b]` method pairs for the table of paired differences a − b (`differences_table`).
        independent: `(label a, methods a, label b, methods b)` for the table of independent-sample
            (Welch) differences (`independent_table`).
        superseded: Rows that left results.csv (`results_superseded.csv`): runs on a set made
            again that came out different are tabled per set (`makings_table`).
        pools: Name -> methods whose sets `set_means.png` draws as one group (the sweep's `pools`).

    Returns:
        `{"csv"|"table"|"acc_vs_cutoff"|"band_map"|"bandstop_map"|"set_means": path}` for the files
        written.
    """
    results_dir = Path(results_dir)
    written = {"csv": write_csv(rows, results_dir / "results.csv")}
    text = f"# {title}\n\n" + (f"{notes.strip()}\n\n" if notes.strip() else "")
    text += markdown_table(rows, methods=methods, filters=filters) if rows else "No finished runs yet.\n"
    if rows and (diffs := differences_table(rows, pairs, filters)):
        text += ("\n## Paired differences\n\nMethod a − method b in points of clean test accuracy, paired by "
                 "victim seed (same architecture, filter and seed): mean [95 % CI, Student's t] (pairs); "
                 "`*`: the interval excludes 0. Negative: a protects better. The interval covers victim training "
                 "noise for these protected sets only, not the variance of making a protected set again "
                 "(another generator training).\n\n" + diffs)
    if rows and (welch := independent_table(rows, independent, filters)):
        text += ("\n## Independent-sample differences\n\nMethods a − methods b in points, every run one sample "
                 "(protected sets that cannot be paired, such as separately trained generators, pooled): mean "
                 "[95 % CI, Welch's t] (runs of a, runs of b); `*`: the interval excludes 0; no interval while "
                 "a side has one run. Runs on one protected set share it, so with few sets the interval can "
                 "understate the variance of making a set again.\n\n" + welch)
    if rows and (sets := protected_sets_table(rows, methods)):
        text += ("\n## Protected sets\n\nThe sets each method's victims trained on, told apart by "
                 "`protected_fingerprint` (a hash of the set's files, recorded with every run). A method "
                 "with two or more sets was made again and came out different.\n\n" + sets)
    if rows and (makings := makings_table(rows, superseded, methods, filters)):
        text += ("\n## Sets made again\n\nClean test accuracy (%) per protected set, for the methods whose "
                 "set was made again and came out different: the same victims (same commands and seeds) on "
                 "each set. Rows of the superseded sets are kept in `results_superseded.csv`. The spread "
                 "between a method's sets is the variance of making the set again, which the intervals above "
                 "leave out.\n\n" + makings)
        comparisons = list(independent) + [(a, [a], b, [b]) for a, b in pairs]
        sets = set_means(list(rows) + earlier_makings(rows, superseded))
        if p := plot_set_means(sets, results_dir / "set_means.png", list((pools or {}).items()), filters):
            written["set_means"] = p
        if welch_sets := independent_table(sets, comparisons, filters):
            text += ("\n## Set-level differences\n\nThe comparisons above with each protected set as one sample "
                     "(its mean over the victims that trained on it), every making of it counted, so the "
                     "variance of making a set again is in the interval; clean data (nothing made) keeps one "
                     "sample per run: mean [95 % CI, Welch's t] (samples of a, samples of b); no interval while "
                     "a side has one.\n\n" + welch_sets)
    written["table"] = atomic_write_text(results_dir / "table.md", text)
    if rows:
        if p := plot_acc_vs_cutoff(rows, results_dir / "acc_vs_cutoff.png"):
            written["acc_vs_cutoff"] = p
        if p := plot_band_map(rows, results_dir / "band_map.png"):
            written["band_map"] = p
        if p := plot_band_map(rows, results_dir / "bandstop_map.png", family="bandstop"):
            written["bandstop_map"] = p
    if log is not None:
        for p in written.values():
            log(f"wrote {p}")
    return written
