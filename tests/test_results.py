"""Result tables and plots with every attacker family: grouping by filter name, plots per family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fuse_lightning import results as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

FILTERS = [
    "none",
    "lowpass-ideal-0.25",
    "lowpass-ideal-0.5",
    "lowpass-gaussian-0.25",
    "lowpass-gaussian-0.5",
    "lowpass-butterworth-0.5",
    "lowpass-butterworth4-0.5",
    "highpass-ideal-0.25",
    "bandpass-ideal-0.25-0.5",
    "bandstop-ideal-0.5-0.75",
    "bandstop-ideal-0-0.25",
    "bandstop-gaussian-0.25-0.5",
    "bandstop-ideal-0.25-0.5",
    "randband-0.25",
    "gaussblur-1",
    "gaussblur-2",
    "jpeg-10",
    "grayscale",
]


def tiny_rows() -> list[dict]:
    """Two methods x the filters x two seeds; val_acc encodes (method, filter, seed)."""
    rows = []
    for method, base in (("clean", 0.8), ("fuse", 0.2)):
        for j, f in enumerate(FILTERS):
            for seed in (0, 1):
                rows.append({"run_id": f"{method}__fastnet__{f}__s{seed}", "method": method,
                             "arch": "fastnet", "filter": f, "seed": seed, "num_classes": 10,
                             "val_acc": base - 0.01 * j + 0.02 * seed})
    return rows


def test_cutoff_plot_gives_every_method_its_own_color(tmp_path: Path, monkeypatch):
    # 13 methods, as in the standard sweep: the default cycle (10 colors) would draw the 11th in
    # the first one's color.
    import matplotlib
    import matplotlib.axes

    methods = [f"m{i}" for i in range(13)]
    rows = [{"run_id": f"{m}__fastnet__{f}__s0", "method": m, "arch": "fastnet", "filter": f,
             "seed": 0, "num_classes": 10, "val_acc": 0.1 + 0.05 * i}
            for i, m in enumerate(methods) for f in ("none", "lowpass-ideal-0.5")]
    colors = {}
    original = matplotlib.axes.Axes.plot

    def spy(self, xs, ys, *args, **kwargs):
        if kwargs.get("label") in methods:
            colors[kwargs["label"]] = tuple(kwargs["color"])
        return original(self, xs, ys, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    assert R.plot_acc_vs_cutoff(rows, tmp_path / "acc.png") is not None
    assert set(colors) == set(methods)
    assert len(set(colors.values())) == 13
    # up to 10 methods keep matplotlib's default cycle
    ten = R.method_colors(methods[:10])
    assert ten["m0"] == matplotlib.colormaps["tab10"](0) and len(set(ten.values())) == 10


def test_parsed_views_of_names():
    assert R.cutoff_of("none") == ("none", 1.0)
    assert R.cutoff_of("lowpass-gaussian-0.5") == ("gaussian", 0.5)
    assert R.cutoff_of("lowpass-butterworth4-0.5") == ("butterworth4", 0.5)
    assert R.cutoff_of("lowpass-gauss-0.5") == ("gaussian", 0.5)  # aliases read the same
    for other in ("highpass-ideal-0.25", "bandstop-ideal-0.25-0.5", "gaussblur-1", "jpeg-10",
                  "randband-0.25", "invert", "lowpass-ideal-7"):
        assert R.cutoff_of(other) is None
    assert R.band_of("bandpass-ideal-0-0.25") == (0.0, 0.25) and R.band_of("bandstop-ideal-0-0.25") is None
    assert R.stopband_of("bandstop-gaussian-0.25-0.5") == (0.25, 0.5) and R.stopband_of("none") is None
    assert R.spec_of("randband-0.25-s2").seed == 2 and R.spec_of("invert") is None


def test_table_groups_every_new_name():
    rows = tiny_rows()
    stats = R.aggregate(rows)
    assert len(stats) == 2 * len(FILTERS)
    # clean, bandstop-ideal-0.5-0.75 (j = 9): 71 and 73 % -> 72.0 ± 1.4
    mean, std, n = stats[("fastnet", "clean", "bandstop-ideal-0.5-0.75")]
    assert (round(mean, 6), round(std, 3), n) == (72.0, 1.414, 2)
    table = R.markdown_table(rows).splitlines()
    assert table[0] == "| method | " + " | ".join(FILTERS) + " |"
    cells = table[3].split(" | ")
    assert cells[0] == "| fuse" and cells[FILTERS.index("randband-0.25") + 1] == "8.0 ± 1.4"


def test_report_writes_one_plot_per_family(tmp_path: Path):
    rows = tiny_rows()
    written = R.write_report(rows, tmp_path, "all attackers")
    assert set(written) == {"csv", "table", "acc_vs_cutoff", "band_map", "bandstop_map"}
    for key in ("acc_vs_cutoff", "band_map", "bandstop_map"):
        assert written[key].read_bytes()[:8] == PNG_MAGIC
    assert written["bandstop_map"].name == "bandstop_map.png"
    # without band-stop rows there is no band-stop map, and the other way round
    no_stop = [r for r in rows if not r["filter"].startswith("bandstop")]
    assert R.plot_band_map(no_stop, tmp_path / "x.png", family="bandstop") is None
    only_stop = [r for r in rows if r["filter"].startswith("bandstop")]
    assert set(R.write_report(only_stop, tmp_path / "stop", "t")) == {"csv", "table", "bandstop_map"}
    with pytest.raises(ValueError, match="family"):
        R.plot_band_map(rows, tmp_path / "x.png", family="lowpass")


def test_cutoff_plot_draws_a_line_per_lowpass_family(tmp_path: Path, monkeypatch):
    drawn = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.plot

    def spy(self, xs, ys, *args, **kwargs):
        drawn.append((kwargs.get("label"), kwargs.get("linestyle"), list(xs), list(ys)))
        return original(self, xs, ys, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    assert R.plot_acc_vs_cutoff(tiny_rows(), tmp_path / "acc.png") is not None
    # 2 methods x 4 families (ideal, gaussian, butterworth, butterworth4); "none" on every line
    assert len(drawn) == 8
    styles = {style for _, style, _, _ in drawn}
    assert len(styles) == 4
    ideal_clean = [d for d in drawn if d[0] == "clean" and d[1] == "-"]
    assert len(ideal_clean) == 1 and ideal_clean[0][2] == [0.25, 0.5, 1.0]
    # ideal 0.25, ideal 0.5, none: 79 %, 78 %, 80 % (+1 for the seed mean)
    assert [round(v, 6) for v in ideal_clean[0][3]] == [80.0, 79.0, 81.0]
    # only ideal low-pass rows: one line per method, no family styles needed
    drawn.clear()
    ideal = [r for r in tiny_rows() if r["filter"] in ("none", "lowpass-ideal-0.25", "lowpass-ideal-0.5")]
    assert R.plot_acc_vs_cutoff(ideal, tmp_path / "ideal.png") is not None
    assert len(drawn) == 2


def test_paired_differences_match_a_hand_computed_t_interval():
    # fuse - clean per seed: -50, -54, -58 points -> mean -54, sd 4, n 3, t(0.975, 2) = 4.3027
    rows = []
    for seed, (clean, fuse) in enumerate(((0.80, 0.30), (0.82, 0.28), (0.84, 0.26))):
        rows += [{"method": "clean", "arch": "fastnet", "filter": "none", "seed": seed, "val_acc": clean},
                 {"method": "fuse", "arch": "fastnet", "filter": "none", "seed": seed, "val_acc": fuse}]
    rows.append({"method": "fuse", "arch": "fastnet", "filter": "none", "seed": 9, "val_acc": 0.1})  # unpaired
    mean, low, high, n = R.paired_differences(rows, "fuse", "clean")[("fastnet", "none")]
    half = 4.302653 * 4.0 / 3 ** 0.5
    assert n == 3 and mean == pytest.approx(-54.0)
    assert (low, high) == (pytest.approx(-54.0 - half, abs=1e-4), pytest.approx(-54.0 + half, abs=1e-4))
    table = R.differences_table(rows, [["fuse", "clean"]])
    assert table.splitlines()[0] == "| filter | fuse − clean |"
    assert table.splitlines()[2] == "| none | -54.0 [-63.9, -44.1]* (3) |"
    # an interval that contains 0 has no star; a single pair has no interval
    noisy = [dict(r, val_acc=r["val_acc"] + (0.6 if r["method"] == "fuse" and r["seed"] == 0 else 0)) for r in rows]
    assert "*" not in R.differences_table(noisy, [["fuse", "clean"]]).splitlines()[2]
    assert R.differences_table(rows[:2], [["fuse", "clean"]]).splitlines()[2] == "| none | -50.0 (1) |"
    assert R.differences_table(rows, [["fuse", "em"]]) == ""


def test_table_marks_cells_with_an_unusual_seed_count(tmp_path: Path):
    rows = tiny_rows()[:-1]  # the last cell (fuse, grayscale) loses a seed
    lines = R.markdown_table(rows).splitlines()
    assert lines[3].endswith("| 3.0 (n=1) |") and lines[2].endswith("| 64.0 ± 1.4 |")
    text = R.write_report(rows, tmp_path, "t", pairs=[["fuse", "clean"]])["table"].read_text()
    assert "## Paired differences" in text and "| none | -60.0" in text


def test_welch_difference_matches_scipys_unequal_variance_t_test():
    from scipy import stats as st

    a, b = [10.0, 12.0, 14.0], [20.0, 20.0, 26.0]  # means 12 and 22, variances 4 and 12
    diff, low, high = R.welch_difference(a, b)
    assert diff == pytest.approx(-10.0)
    # Welch-Satterthwaite: se^2 = 4/3 + 12/3, dof = (16/3)^2 / ((4/3)^2/2 + 4^2/2) = 3.2
    half = st.t.ppf(0.975, 3.2) * (16 / 3) ** 0.5
    assert (low, high) == (pytest.approx(-10.0 - half), pytest.approx(-10.0 + half))
    ci = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (low, high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert low < -10.0 < high < 0  # this difference is clearly below 0
    # a single value per side: a difference without an interval
    d1, l1, h1 = R.welch_difference([1.0], [3.0, 4.0])
    assert d1 == pytest.approx(-2.5) and l1 != l1 and h1 != h1
    with pytest.raises(ValueError, match="at least one value"):
        R.welch_difference([], [1.0])


def test_generator_variance_script_averages_over_generators_from_several_sweeps(tmp_path: Path):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "experiments" / "generator_variance.py"
    spec_ = importlib.util.spec_from_file_location("generator_variance", script)
    gv = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(gv)

    def row(method, filt, seed, acc):
        return {"run_id": f"{method}-{filt}-{seed}", "method": method, "arch": "fastnet", "filter": filt,
                "seed": seed, "val_acc": acc}

    # sweep A holds generator 0 of both variants (with a second victim seed, which is ignored)
    R.write_csv([row("fuse", "none", 0, 0.30), row("fuse", "none", 1, 0.90), row("plain", "none", 0, 0.10),
                 row("fuse", "lp", 0, 0.20), row("plain", "lp", 0, 0.12)], tmp_path / "a.csv")
    R.write_csv([row("fuse_g1", "none", 0, 0.34), row("fuse_g2", "none", 0, 0.32),
                 row("plain_g1", "none", 0, 0.11), row("plain_g2", "none", 0, 0.12),
                 row("fuse_g1", "lp", 0, 0.22)], tmp_path / "b.csv")
    a, b = str(tmp_path / "a.csv"), str(tmp_path / "b.csv")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        "victim_seed: 0\nfilters: [none, lp]\nvariants:\n"
        f"  fuse: [{{results: {a}, method: fuse}}, {{results: {b}, method: fuse_g1}}, {{results: {b}, method: fuse_g2}}]\n"
        f"  plain: [{{results: {a}, method: plain}}, {{results: {b}, method: plain_g1}}, {{results: {b}, method: plain_g2}}]\n"
        "compare: [[fuse, plain]]\n")
    out = tmp_path / "gv.md"
    gv.main([str(spec_path), "--out", str(out)])
    lines = out.read_text().splitlines()
    fuse = next(line for line in lines if line.startswith("| fuse |"))
    # none: 30, 34, 32 -> 32.0 ± 2.0; lp: generators 0 and 1 only (20, 22), generator 2 has no run
    assert "32.0 ± 2.0 (3) [30.0, 34.0, 32.0]" in fuse and "21.0 ± 1.4 (2) [20.0, 22.0, –]" in fuse
    diff = next(line for line in lines if line.startswith("| none |") and "[" in line and "*" in line)
    d, low, high = R.welch_difference([30, 34, 32], [10, 11, 12])
    assert f"{d:+.1f} [{low:+.1f}, {high:+.1f}]*" in diff and d == pytest.approx(21.0)
    # lp: plain has one generator there -> a difference without an interval
    assert any(line.startswith("| lp |") and "(n=2,1)" in line for line in lines)
    # a compare pair naming an unknown variant is refused, naming it
    spec_path.write_text(spec_path.read_text().replace("[[fuse, plain]]", "[[fuse, nope]]"))
    with pytest.raises(SystemExit, match="nope"):
        gv.main([str(spec_path)])


def test_independent_differences_pool_generators_and_match_welchs_formula(tmp_path: Path):
    from scipy import stats as st

    # two generators of one recipe (fuse: 20, 22 %; fuse_g1: 18 %) against one set of EM (40, 44, 36 %)
    acc = {"fuse": [0.20, 0.22], "fuse_g1": [0.18], "em": [0.40, 0.44, 0.36], "clean": [0.80]}
    rows = [{"method": m, "arch": "fastnet", "filter": "lowpass-ideal-0.25", "seed": s, "val_acc": v}
            for m, values in acc.items() for s, v in enumerate(values)]
    rows.append({"method": "em", "arch": "fastnet", "filter": "none", "seed": 0, "val_acc": 0.1})  # no fuse run
    diffs = R.independent_differences(rows, ["fuse", "fuse_g1"], ["em"])
    assert set(diffs) == {("fastnet", "lowpass-ideal-0.25")}
    mean, low, high, na, nb = diffs[("fastnet", "lowpass-ideal-0.25")]
    # by hand: means 20 and 40, variances 4 and 16 over 3 runs each; Welch-Satterthwaite dof
    se2a, se2b = 4.0 / 3, 16.0 / 3
    dof = (se2a + se2b) ** 2 / (se2a**2 / 2 + se2b**2 / 2)
    half = st.t.ppf(0.975, dof) * (se2a + se2b) ** 0.5
    assert (na, nb) == (3, 3) and mean == pytest.approx(-20.0)
    assert (low, high) == (pytest.approx(-20.0 - half), pytest.approx(-20.0 + half))
    comparisons = [("fuse_all", ["fuse", "fuse_g1"], "em", ["em"]), ("fuse", ["fuse"], "clean", ["clean"]),
                   ("fuse", ["fuse"], "lsp", ["lsp"])]
    table = R.independent_table(rows, comparisons, filters=["none", "lowpass-ideal-0.25"]).splitlines()
    assert table[0] == "| filter | fuse_all − em | fuse − clean |"  # lsp has no runs: no column
    assert table[2] == "| none | – | – |"
    assert table[3] == f"| lowpass-ideal-0.25 | -20.0 [{-20 - half:+.1f}, {-20 + half:+.1f}]* (3, 3) | -59.0 (2, 1) |"
    assert R.independent_table(rows, comparisons[2:]) == ""
    text = R.write_report(rows, tmp_path, "t", independent=comparisons)["table"].read_text()
    assert "## Independent-sample differences" in text and table[3] in text
    assert "## Independent-sample" not in R.write_report(rows, tmp_path / "b", "t")["table"].read_text()


def test_report_counts_runs_per_protected_set(tmp_path: Path):
    rows = [{"run_id": f"{m}__fastnet__none__s{s}", "method": m, "arch": "fastnet", "filter": "none", "seed": s,
             "val_acc": 0.1, "protected_fingerprint": fp}
            for m, s, fp in [("clean", 0, None), ("em", 0, "aaaa"), ("em", 1, "aaaa"), ("fuse", 0, None),
                             ("fuse", 1, "bbbb"), ("fuse", 2, "cccc")]]
    table = R.protected_sets_table(rows, methods=["fuse", "em", "clean"])
    lines = table.strip().splitlines()
    # clean has no protected set; fuse's was made twice more (two recorded sets, one run each)
    assert lines[2:] == ["| fuse | 2 | `bbbb`: 1, `cccc`: 1, unrecorded: 1 |", "| em | 1 | `aaaa`: 2 |"]
    assert R.protected_sets_table([r for r in rows if r["method"] == "clean"]) == ""
    text = R.write_report(rows, tmp_path, "t", methods=["fuse", "em", "clean"])["table"].read_text()
    assert "## Protected sets" in text and lines[2] in text
    assert "protected_fingerprint" in (tmp_path / "results.csv").read_text().splitlines()[0]


def test_set_groups_gather_pooled_sets_and_clean_runs(tmp_path: Path):
    """Sets of pooled methods land in one group, a method in no pool is its own, clean runs stay
    one value each; the plot draws one dot per value and nothing without rows."""
    rows = [{"arch": "a", "method": m, "filter": "none", "protected_fingerprint": fp, "val_acc": v}
            for m, fp, v in (("fuse", "f1", 0.30), ("fuse", "f2", 0.36), ("fuse_g1", "g1", 0.28),
                             ("em", "e1", 0.44), ("em_g1", "e2", 0.26), ("rrc", "r1", 0.33))]
    rows += [{"arch": "a", "method": "clean", "filter": "none", "protected_fingerprint": "", "val_acc": v}
             for v in (0.47, 0.43)]
    rows += [{"arch": "b", "method": "fuse", "filter": "jpeg-10", "protected_fingerprint": "f1", "val_acc": 0.4}]
    groups = [("fuse_gens", ["fuse", "fuse_g1"]), ("em_sets", ["em", "em_g1"]), ("first_only", ["fuse"])]
    points = R.set_groups(rows, groups)
    assert points == {("a", "fuse_gens", "none"): pytest.approx([30.0, 36.0, 28.0]),
                      ("a", "em_sets", "none"): pytest.approx([44.0, 26.0]),
                      ("a", "rrc", "none"): pytest.approx([33.0]),
                      ("a", "clean", "none"): pytest.approx([47.0, 43.0]),
                      ("b", "fuse_gens", "jpeg-10"): pytest.approx([40.0])}
    import matplotlib.pyplot as plt
    from matplotlib.collections import PathCollection

    drawn = []
    real_close = plt.close
    def keep(fig=None):  # count the figure's dots (scatter collections) before it is closed
        drawn.extend(len(c.get_offsets()) for ax in fig.axes for c in ax.collections
                     if isinstance(c, PathCollection))
        real_close(fig)
    plt.close = keep
    try:
        path = R.plot_set_means(rows, tmp_path / "sets.png", groups)
    finally:
        plt.close = real_close
    assert path is not None and path.stat().st_size > 1000 and sum(drawn) == len(rows)
    assert R.plot_set_means([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_set_means_count_each_protected_set_once():
    rows = [{"arch": "a", "method": "fuse", "filter": "none", "protected_fingerprint": "f1", "val_acc": v}
            for v in (0.2, 0.4, 0.3)]
    rows += [{"arch": "a", "method": "fuse", "filter": "none", "protected_fingerprint": "f2", "val_acc": 0.6},
             {"arch": "a", "method": "fuse", "filter": "jpeg-10", "protected_fingerprint": "f1", "val_acc": 0.5},
             {"arch": "a", "method": "clean", "filter": "none", "protected_fingerprint": None, "val_acc": 0.7},
             {"arch": "a", "method": "clean", "filter": "none", "protected_fingerprint": "", "val_acc": 0.8},
             {"arch": "a", "method": "fuse", "filter": "none", "protected_fingerprint": "f3", "val_acc": None}]
    sets = {(r["method"], r["filter"], r["protected_fingerprint"]): r["val_acc"] for r in R.set_means(rows)}
    assert sets == {("fuse", "none", "f1"): pytest.approx(0.3), ("fuse", "none", "f2"): 0.6,
                    ("fuse", "jpeg-10", "f1"): 0.5, ("clean", "none", None): 0.7, ("clean", "none", ""): 0.8}


def test_training_curves_script_reads_each_runs_epochs_and_replots_from_its_csv(tmp_path: Path):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "experiments" / "training_curves.py"
    spec_ = importlib.util.spec_from_file_location("training_curves", script)
    tc = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(tc)

    def log(run_id: str, version: int, rows: list[tuple[int, float | None]]):
        path = tmp_path / "work" / "runs" / run_id / "logs" / f"version_{version}" / "metrics.csv"
        path.parent.mkdir(parents=True)
        method, arch, filt, seed = run_id.split("__")  # the finished run's record, as the sweep writes it
        (path.parents[2] / "result.json").write_text(json.dumps(
            {"run_id": run_id, "method": method, "arch": arch, "filter": filt, "seed": int(seed[1:])}))
        # as Lightning's CSV logger writes it: train rows without val/acc between the epoch rows
        lines = ["epoch,step,train/loss,val/acc"] + [f"{e},{10 * e},1.5,{'' if a is None else a}" for e, a in rows]
        path.write_text("\n".join(lines) + "\n")

    log("em_classwise__resnet18__grayscale__s1", 0, [(0, None), (0, 0.51), (1, 0.60), (2, 0.31)])
    log("em_classwise__resnet18__grayscale__s1", 1, [(2, 0.21), (3, 0.19)])  # resumed: epoch 2 again
    log("fuse__resnet18__grayscale__s1", 0, [(0, 0.50), (1, 0.62)])
    log("fuse__resnet18__none__s1", 0, [(0, 0.12)])  # another filter: left out
    (tmp_path / "work" / "runs" / "fuse__resnet18__grayscale__s2").mkdir()  # unfinished (no result.json): left out

    out = tmp_path / "curves_gray.v1"  # a dot in the prefix is kept
    tc.main([str(tmp_path / "work"), "--filter", "grayscale", "--out", str(out)])
    rows = tc.read_rows(Path(f"{out}.csv"))
    em = [(r["epoch"], r["val_acc"]) for r in rows if r["method"] == "em_classwise"]
    assert em == [(0, 0.51), (1, 0.60), (2, 0.21), (3, 0.19)]  # the later version wins for epoch 2
    assert {r["run_id"] for r in rows} == {"em_classwise__resnet18__grayscale__s1", "fuse__resnet18__grayscale__s1"}
    png = Path(f"{out}.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    tc.main(["--from_csv", f"{out}.csv", "--out", str(out)])  # replot without the runs
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --methods narrows; bad input names the path or the filter
    tc.main([str(tmp_path / "work"), "--filter", "grayscale", "--methods", "fuse", "--out", str(out)])
    assert {r["method"] for r in tc.read_rows(Path(f"{out}.csv"))} == {"fuse"}
    # --keep_rows keeps the CSV's runs whose dirs are gone; a run found again replaces its rows
    tc.main([str(tmp_path / "work"), "--filter", "grayscale", "--out", str(out)])
    shutil.rmtree(tmp_path / "work" / "runs" / "em_classwise__resnet18__grayscale__s1")
    tc.main([str(tmp_path / "work"), "--filter", "grayscale", "--out", str(out), "--keep_rows"])
    kept = tc.read_rows(Path(f"{out}.csv"))
    assert [(r["method"], r["epoch"]) for r in kept] == [("em_classwise", e) for e in range(4)] + [("fuse", 0), ("fuse", 1)]
    tc.main([str(tmp_path / "work"), "--filter", "grayscale", "--out", str(out)])  # without it: only what is found
    assert {r["method"] for r in tc.read_rows(Path(f"{out}.csv"))} == {"fuse"}
    with pytest.raises(SystemExit, match="different filters"):
        tc.main([str(tmp_path / "work"), "--filter", "none", "--out", str(out), "--keep_rows"])
    with pytest.raises(SystemExit, match="no runs/ folder"):
        tc.main([str(tmp_path), "--filter", "grayscale", "--out", str(out)])
    with pytest.raises(SystemExit, match="'jpeg-10'"):
        tc.main([str(tmp_path / "work"), "--filter", "jpeg-10", "--out", str(out)])
