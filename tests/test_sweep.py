"""Sweep runner and result reporting: grid, validation, resume, parsing, tables, plots, end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fuse_lightning import results as R
from fuse_lightning import sweep as S

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_sweep(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASIC = """
name: t
results_dir: {tmp}/results
work_dir: {tmp}/work
victim_configs: [configs/victim_cifar10.yaml]
victim_args: ["--trainer.max_epochs", "1"]
methods:
  clean: {{}}
  noise:
    prepare:
      - [fuse, baseline, --data.init_args.data_dir, "{{data_dir}}", --out, "{{protected_dir}}",
         --log, "{{method_dir}}/x", --json, '{{"a": 1}}']
grid:
  method: [noise, clean]
  arch: [fastnet, resnet18]
  filter: [none, lowpass-ideal-0.5]
  seed: [0, 1]
"""


@pytest.fixture
def basic(tmp_path: Path) -> S.Sweep:
    return S.load_sweep(write_sweep(tmp_path, BASIC.format(tmp=tmp_path)))


# ------------------------------------------------------------------------------ grid, commands


def test_expand_grid_count_ids_and_order(basic: S.Sweep, tmp_path: Path):
    runs = S.expand_grid(basic)
    assert len(runs) == 2 * 2 * 2 * 2
    # Method-major, in the order of the sweep file (noise before clean), seed innermost.
    assert [r.run_id for r in runs[:3]] == [
        "noise__fastnet__none__s0",
        "noise__fastnet__none__s1",
        "noise__fastnet__lowpass-ideal-0.5__s0",
    ]
    assert runs[-1].run_id == "clean__resnet18__lowpass-ideal-0.5__s1"
    assert len({r.run_id for r in runs}) == len(runs)
    assert runs[0].run_dir == tmp_path / "work" / "runs" / "noise__fastnet__none__s0"
    assert runs[0].result_path == runs[0].run_dir / "result.json"
    assert S.expand_grid(basic) == runs  # deterministic


def test_victim_command_and_placeholders(basic: S.Sweep, tmp_path: Path):
    runs = {r.run_id: r for r in S.expand_grid(basic)}
    cmd = S.victim_command(basic, runs["noise__fastnet__lowpass-ideal-0.5__s1"], "/data")
    assert cmd[:4] == [sys.executable, "-m", "fuse_lightning", "fit"]

    def value(flag: str) -> str:
        return cmd[len(cmd) - 1 - cmd[::-1].index(flag) + 1]  # last occurrence wins, like the CLI

    assert value("--config") == "configs/victim_cifar10.yaml"
    assert value("--data.init_args.data_dir") == "/data"
    assert value("--data.init_args.protected_dir") == str(tmp_path / "work" / "protected" / "noise")
    assert value("--data.init_args.train_filter") == "lowpass-ideal-0.5"
    assert value("--model.init_args.arch") == "fastnet"
    assert value("--seed_everything") == "1"
    run_dir = str(runs["noise__fastnet__lowpass-ideal-0.5__s1"].run_dir)
    assert value("--trainer.logger.init_args.save_dir") == run_dir
    assert value("--trainer.default_root_dir") == run_dir
    assert value("--trainer.logger.init_args.version") == ""
    # The clean set has no protected_dir, and "none" adds no filter flag.
    clean = S.victim_command(basic, runs["clean__resnet18__none__s0"], "/data")
    assert "--data.init_args.protected_dir" not in clean
    assert "--data.init_args.train_filter" not in clean

    method = basic.methods["noise"]
    prep = S.expand_command(method.prepare[0], {"data_dir": "/d", "protected_dir": method.protected_dir,
                                                "method_dir": method.method_dir, "work_dir": "w"})
    assert prep[:4] == [sys.executable, "-m", "fuse_lightning", "baseline"]
    assert prep[prep.index("--data.init_args.data_dir") + 1] == "/d"
    assert prep[prep.index("--out") + 1] == str(tmp_path / "work" / "protected" / "noise")
    assert prep[prep.index("--log") + 1] == str(tmp_path / "work" / "methods" / "noise" / "x")
    assert prep[prep.index("--json") + 1] == '{"a": 1}'  # other braces are left alone


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("method: [noise, clean]", "method: [noise, clean, fuse]"), "grid.method"),
        (lambda t: t.replace("lowpass-ideal-0.5]", "lowpass-magic-0.5]"), "grid.filter"),
        (lambda t: t.replace("lowpass-ideal-0.5]", "lowpass-ideal-0.50]"), "should be written"),
        (lambda t: t.replace("arch: [fastnet, resnet18]", "arch: [fastnet, resnet9000]"), "grid.arch"),
        (lambda t: t.replace("victim_args:", "victim_argz:"), "unknown keys ['victim_argz']"),
        (lambda t: t.replace("seed: [0, 1]", "seed: [0, 0]"), "grid.seed"),
        (lambda t: t.replace("{{method_dir}}/x", "{{methd_dir}}/x"), "unknown placeholder {methd_dir}"),
        (lambda t: t.replace("    prepare:", "    prepare:\n      - []\n    prepair:"), "methods.noise"),
        (lambda t: t.replace("name: t\n", ""), "name: missing"),
    ],
)
def test_validation_errors_name_file_and_key(tmp_path: Path, edit, message: str):
    path = write_sweep(tmp_path, edit(BASIC).format(tmp=tmp_path))
    with pytest.raises(S.SweepError) as info:
        S.load_sweep(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_from_sweep_and_explicit_protected_dir(tmp_path: Path):
    base = write_sweep(tmp_path, BASIC.format(tmp=tmp_path), "base.yaml")
    other = write_sweep(tmp_path, f"""
name: other
results_dir: {tmp_path}/r2
work_dir: {tmp_path}/w2
methods:
  clean: {{}}
  noise: {{from_sweep: {base}}}
  fixed: {{protected_dir: "{{work_dir}}/elsewhere"}}
grid: {{method: [clean, noise, fixed], arch: [fastnet], filter: [bandpass-ideal-0-0.25]}}
""", "other.yaml")
    sweep = S.load_sweep(other)
    assert sweep.methods["noise"].protected_dir == tmp_path / "work" / "protected" / "noise"
    assert sweep.methods["noise"].prepare  # the commands come along
    assert sweep.methods["fixed"].protected_dir == tmp_path / "w2" / "elsewhere"
    assert sweep.grid["seed"] == [0]  # default
    assert [r.run_id for r in S.expand_grid(sweep)][1] == "noise__fastnet__bandpass-ideal-0-0.25__s0"
    # work_dir override (used by the demo) moves the sweep's own methods, not borrowed ones.
    moved = S.load_sweep(other, work_dir=tmp_path / "w3")
    assert moved.methods["fixed"].protected_dir == tmp_path / "w3" / "elsewhere"
    assert moved.methods["noise"].protected_dir == tmp_path / "work" / "protected" / "noise"


# ------------------------------------------------------------------------------ execution


def fake_metrics(val: list[float], train: list[float]) -> str:
    lines = ["epoch,step,train/acc,train/loss_epoch,val/acc,val/loss"]
    for epoch, (v, t) in enumerate(zip(val, train, strict=True)):
        lines.append(f"{epoch},{10 * epoch + 9},,,{v},1.0")
        lines.append(f"{epoch},{10 * epoch + 9},{t},0.5,,")
    return "\n".join(lines) + "\n"


class FakeExecutor:
    """Stands in for a victim process: writes metrics.csv where the logger would."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd, log_path, env):
        self.calls.append(cmd)
        run_dir = Path(cmd[cmd.index("--trainer.logger.init_args.save_dir") + 1])
        if run_dir.name in self.fail:
            log_path.write_text("Traceback ...\nRuntimeError: boom\n")
            return 3
        seed = int(cmd[cmd.index("--seed_everything") + 1])
        (run_dir / "metrics.csv").write_text(fake_metrics([0.3, 0.5 + 0.1 * seed, 0.4], [0.6, 0.7, 0.8]))
        (run_dir / "hparams.yaml").write_text("arch: fastnet\nnum_classes: 10\n")
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
        return 0


def test_finished_runs_are_skipped_and_failures_recorded(basic: S.Sweep):
    runs = [r for r in S.expand_grid(basic) if r.method == "clean" and r.arch == "fastnet"]
    done = runs[0]
    done.run_dir.mkdir(parents=True)
    done.result_path.write_text(json.dumps({"run_id": done.run_id, "val_acc": 0.9,
                                            "run_key": S.run_key(basic, done, "/data")}))
    executor = FakeExecutor(fail={runs[1].run_id})
    summary = S.run_victims(basic, runs, "/data", executor=executor, log=lambda s: None)
    executed = [Path(c[c.index("--trainer.default_root_dir") + 1]).name for c in executor.calls]
    assert done.run_id not in executed
    assert executed == [r.run_id for r in runs[1:]]
    assert summary.skipped == 1
    assert [f["run_id"] for f in summary.failed] == [runs[1].run_id]
    assert "boom" in json.loads((runs[1].run_dir / "failed.json").read_text())["tail"]
    assert not runs[1].result_path.exists()
    row = json.loads(runs[3].result_path.read_text())
    assert row["val_acc"] == pytest.approx(0.4) and row["best_val_acc"] == pytest.approx(0.6)
    assert row["num_classes"] == 10 and row["filter"] == "lowpass-ideal-0.5" and row["seed"] == 1
    assert not (runs[3].run_dir / "checkpoints" / "last.ckpt").exists()  # keep_checkpoints: false
    # A rerun executes only the failed run.
    again = FakeExecutor()
    summary = S.run_victims(basic, runs, "/data", executor=again, log=lambda s: None)
    assert len(again.calls) == 1 and summary.skipped == 3 and not summary.failed
    assert not (runs[1].run_dir / "failed.json").exists()


def test_max_runs_limits_pending_runs(basic: S.Sweep):
    executor = FakeExecutor()
    summary = S.run_victims(basic, S.expand_grid(basic), "/d", max_runs=2, executor=executor, log=lambda s: None)
    assert len(executor.calls) == 2 and len(summary.finished) == 2


def test_prepare_skips_existing_sets_and_reports_failures(basic: S.Sweep):
    calls = []

    def executor(cmd, log_path, env):
        calls.append(cmd)
        return 1

    assert S.prepare_methods(basic, ["clean", "noise"], "/d", executor, log=lambda s: None) == ["noise"]
    assert len(calls) == 1 and calls[0][3] == "baseline"
    protected = basic.methods["noise"].protected_dir
    protected.mkdir(parents=True)
    (protected / "manifest.json").write_text("{}")
    record = {"key": S.prepare_key(basic, basic.methods["noise"], "/d")}
    R.atomic_write_text(basic.methods["noise"].record_path, json.dumps(record))
    assert S.prepare_methods(basic, ["clean", "noise"], "/d", executor, log=lambda s: None) == []
    assert len(calls) == 1


def fake_prepare(calls: list):
    """A prepare executor that writes the protected set's manifest where the command says."""

    def executor(cmd, log_path, env):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text(json.dumps({"cmd": cmd}))
        return 0

    return executor


def test_changed_settings_rerun_stale_runs_and_methods(tmp_path: Path, capsys):
    """Unchanged settings skip finished work; changed victim_args or prepare commands redo it."""
    path = write_sweep(tmp_path, BASIC.format(tmp=tmp_path))
    sweep = S.load_sweep(path)
    runs = [r for r in S.expand_grid(sweep) if r.arch == "fastnet" and r.filter == "none" and r.seed == 0]
    assert [r.method for r in runs] == ["noise", "clean"]
    prepared: list = []
    assert S.prepare_methods(sweep, ["noise", "clean"], "/d", fake_prepare(prepared), log=lambda s: None) == []
    executor = FakeExecutor()
    S.run_victims(sweep, runs, "/d", executor=executor, log=lambda s: None)
    assert len(executor.calls) == 2 and all(S.result_is_current(sweep, r, "/d") for r in runs)
    record = json.loads(sweep.methods["noise"].record_path.read_text())
    assert record["commands"][0][0] == "python"  # the interpreter path is not part of the key

    # Same settings: nothing is prepared or run again.
    again = FakeExecutor()
    assert S.prepare_methods(sweep, ["noise", "clean"], "/d", fake_prepare(prepared), log=lambda s: None) == []
    summary = S.run_victims(sweep, runs, "/d", executor=again, log=lambda s: None)
    assert len(prepared) == 1 and again.calls == [] and summary.skipped == 2
    assert [r["run_id"] for r in S.sweep_rows(sweep, "/d")] == [r.run_id for r in runs]

    # Other victim_args: both results are stale; the report leaves them out and says so.
    path.write_text(BASIC.format(tmp=tmp_path).replace('"--trainer.max_epochs", "1"', '"--trainer.max_epochs", "2"'))
    changed = S.load_sweep(path)
    assert not any(S.result_is_current(changed, r, "/d") for r in runs)
    rows, stale = S.split_results(changed, "/d")
    assert rows == [] and stale == [r.run_id for r in runs]
    S.write_sweep_report(changed, log=print, data_dir="/d")
    assert "2 stale result(s) left out" in capsys.readouterr().out
    rerun = FakeExecutor()
    summary = S.run_victims(changed, runs, "/d", executor=rerun, log=lambda s: None)
    assert len(rerun.calls) == 2 and summary.stale == 2 and summary.skipped == 0
    assert "--trainer.max_epochs" in rerun.calls[0] and "2" in rerun.calls[0]
    assert all(S.result_is_current(changed, r, "/d") for r in runs)
    assert not S.result_is_current(sweep, runs[0], "/d")  # the old settings' result is gone
    # Without a data dir the report compares with the one each result recorded.
    assert len(S.sweep_rows(changed)) == 2 and S.sweep_rows(changed, "/elsewhere") == []

    # Other prepare commands: the method is prepared again (old set moved aside) and its runs
    # are stale although their victim command is the same; the clean run stays done.
    path.write_text(BASIC.format(tmp=tmp_path).replace('"--trainer.max_epochs", "1"', '"--trainer.max_epochs", "2"')
                    .replace("--log,", "--verbose, --log,"))
    reprepared = S.load_sweep(path)
    noise_run, clean_run = runs
    assert S.victim_command(reprepared, noise_run, "/d") == S.victim_command(changed, noise_run, "/d")
    assert not S.method_is_current(reprepared, reprepared.methods["noise"], "/d")
    assert not S.result_is_current(reprepared, noise_run, "/d")
    assert S.result_is_current(reprepared, clean_run, "/d")
    assert S.prepare_methods(reprepared, ["noise", "clean"], "/d", fake_prepare(prepared), log=lambda s: None) == []
    assert len(prepared) == 2 and "--verbose" in prepared[-1]
    protected = reprepared.methods["noise"].protected_dir
    assert (protected.with_name(protected.name + ".stale") / "manifest.json").is_file()
    assert S.method_is_current(reprepared, reprepared.methods["noise"], "/d")
    last = FakeExecutor()
    S.run_victims(reprepared, runs, "/d", executor=last, log=lambda s: None)
    assert [Path(c[c.index("--trainer.default_root_dir") + 1]).name for c in last.calls] == [noise_run.run_id]


def test_results_without_a_key_are_stale(basic: S.Sweep):
    run = S.expand_grid(basic)[0]
    run.run_dir.mkdir(parents=True)
    run.result_path.write_text(json.dumps({"run_id": run.run_id, "val_acc": 0.5, "data_dir": "/d"}))
    assert not S.result_is_current(basic, run, "/d") and not S.result_is_current(basic, run, None)
    run.result_path.write_text("{not json")
    assert S.read_result(run) is None and S.split_results(basic, "/d") == ([], [run.run_id])


def test_parse_metrics_last_and_best(tmp_path: Path):
    path = tmp_path / "metrics.csv"
    path.write_text(fake_metrics([0.2, 0.61, 0.55], [0.3, 0.4, 0.45]))
    parsed = S.parse_metrics(path)
    assert parsed == {"val_acc": pytest.approx(0.55), "best_val_acc": pytest.approx(0.61),
                      "train_acc": pytest.approx(0.45), "epochs": 3}
    path.write_text("epoch,step,train/acc\n0,1,0.5\n")
    with pytest.raises(ValueError, match="no val/acc"):
        S.parse_metrics(path)


def test_cli_dry_run_and_wandb_offline(basic: S.Sweep, tmp_path: Path, capsys, monkeypatch):
    path = basic.path
    assert S.sweep_main([str(path), "--dry-run", "--data-dir", "/d"]) == 0
    out = capsys.readouterr().out
    assert out.count("fuse_lightning fit") == 16 and "fuse_lightning baseline" in out
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert S.sweep_main([str(path), "--backend", "wandb"]) == 2
    assert "WANDB_MODE=offline" in capsys.readouterr().err
    cfg = S.wandb_sweep_config(basic)
    assert cfg["method"] == "grid" and cfg["parameters"]["seed"]["values"] == [0, 1]


# ------------------------------------------------------------------------------ results


def synthetic_rows() -> list[dict]:
    rows = []
    filters = ["none", "lowpass-ideal-0.25", "lowpass-ideal-0.5", "jpeg-10"]
    for arch in ("fastnet", "resnet18"):
        for method, base in (("clean", 0.8), ("fuse", 0.2)):
            for j, f in enumerate(filters):
                for seed in (0, 1, 2):
                    rows.append({"run_id": f"{method}__{arch}__{f}__s{seed}", "method": method,
                                 "arch": arch, "filter": f, "seed": seed, "num_classes": 10,
                                 "val_acc": base + 0.05 * j + 0.01 * seed})
    return rows


def test_markdown_table_mean_std():
    rows = synthetic_rows()
    table = R.markdown_table(rows, arch="fastnet")
    lines = table.strip().splitlines()
    assert lines[0] == "| method | none | lowpass-ideal-0.25 | lowpass-ideal-0.5 | jpeg-10 |"
    # clean, none: 80, 81, 82 % -> 81.0 ± 1.0 (sample std); fuse, jpeg-10: 35, 36, 37 -> 36.0 ± 1.0
    assert lines[2] == "| clean | 81.0 ± 1.0 | 86.0 ± 1.0 | 91.0 ± 1.0 | 96.0 ± 1.0 |"
    assert lines[3].startswith("| fuse | 21.0 ± 1.0 |") and lines[3].endswith("| 36.0 ± 1.0 |")
    single = [r for r in rows if r["seed"] == 0 and r["filter"] != "jpeg-10"]
    one = R.markdown_table(single, methods=["fuse", "clean", "em"], filters=["jpeg-10", "none"])
    assert "| fuse | – | 20.0 |" in one and "| em | – | – |" in one
    both = R.markdown_table(rows)
    assert "### fastnet" in both and "### resnet18" in both


def test_csv_and_collect_roundtrip(tmp_path: Path):
    rows = synthetic_rows()[:3]
    for row in rows:
        R.atomic_write_text(tmp_path / "runs" / row["run_id"] / "result.json", json.dumps(row))
    collected = R.collect_results(tmp_path)
    assert sorted(r["run_id"] for r in collected) == sorted(r["run_id"] for r in rows)
    out = R.write_csv([{**rows[0], "command": ["a", "b"]}], tmp_path / "results.csv")
    header, line = out.read_text().splitlines()
    assert header.startswith("run_id,method,arch,filter,seed,val_acc")
    assert line.endswith(",a b") and not list(tmp_path.glob(".results.csv.tmp*"))


def test_plots_are_written(tmp_path: Path):
    rows = synthetic_rows()
    png = R.plot_acc_vs_cutoff(rows, tmp_path / "acc.png")
    assert png is not None and png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    assert R.plot_acc_vs_cutoff([r for r in rows if r["filter"] == "jpeg-10"], tmp_path / "x.png") is None
    assert R.plot_band_map(rows, tmp_path / "band.png") is None
    assert R.cutoff_of("none") == ("none", 1.0) and R.cutoff_of("lowpass-gaussian-0.5") == ("gaussian", 0.5)
    assert R.cutoff_of("grayscale") is None


def test_band_map_from_bandpass_rows(tmp_path: Path):
    bands = ["bandpass-ideal-0.5-0.75", "bandpass-ideal-0-0.25", "bandpass-ideal-0.25-0.5"]
    rows = [{"method": m, "arch": "fastnet", "filter": f, "seed": 0, "val_acc": v}
            for m, vs in (("clean", (0.7, 0.4, 0.6)), ("fuse", (0.6, 0.1, 0.2))) for f, v in zip(bands, vs, strict=True)]
    assert R.band_of("bandpass-ideal-0-0.25") == (0.0, 0.25) and R.band_of("none") is None
    png = R.plot_band_map(rows, tmp_path / "band.png")
    assert png is not None and png.read_bytes()[:8] == PNG_MAGIC
    written = R.write_report(rows, tmp_path / "rep", "bands")
    assert set(written) == {"csv", "table", "band_map"}  # no low-pass rows: no cutoff plot


# ------------------------------------------------------------------------------ shipped sweeps


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweeps_load_expand_validate(path: Path, monkeypatch):
    monkeypatch.chdir(REPO)  # paths in sweep files are relative to the repository root
    sweep = S.load_sweep(path.relative_to(REPO))
    runs = S.expand_grid(sweep)
    assert runs and len(runs) == np.prod([len(v) for v in sweep.grid.values()])
    assert S.missing_files(sweep) == []
    for method in sweep.grid["method"]:
        m = sweep.methods[method]
        # Every method either trains on the clean set or says how its protected set is made.
        assert m.protected_dir is None or m.prepare
    assert S.victim_command(sweep, runs[-1], "data")[3] == "fit"


# ------------------------------------------------------------------------------ end to end

PREPARE = """
import json, sys, numpy as np
from pathlib import Path
from fuse_lightning.data import write_cifar
rng = np.random.default_rng(0)
labels = np.arange(64) % 10
images = (rng.integers(0, 60, (64, 3, 32, 32)) + 19 * labels[:, None, None, None]).astype(np.uint8)
write_cifar(sys.argv[1], images, labels, "cifar10", "train")
from fuse_lightning.manifest import write_manifest  # readers verify it: list every file
write_manifest(Path(sys.argv[1]), {"method": "tiny"})
"""


@pytest.mark.skipif(importlib.util.find_spec("fuse_lightning.data") is None, reason="needs fuse_lightning.data")
def test_tiny_sweep_end_to_end(tmp_path: Path, monkeypatch):
    from fuse_lightning.data import write_cifar

    # The DataModule checks the clean test split has its official 10000 images; the training
    # set comes from a tiny protected copy made by the prepare step.
    rng = np.random.default_rng(1)
    labels = np.arange(10000) % 10
    write_cifar(tmp_path / "data", rng.integers(0, 256, (10000, 3, 32, 32), dtype=np.uint8),
                labels, "cifar10", "test")
    monkeypatch.chdir(REPO)
    path = write_sweep(tmp_path, f"""
name: tiny
results_dir: {tmp_path}/results
work_dir: {tmp_path}/work
victim_configs: [configs/victim_cifar10.yaml]
victim_args: [--data.init_args.download, "false", --data.init_args.batch_size, "32",
  --data.init_args.test_subset, "100", --data.init_args.eval_batch_size, "100",
  --trainer.max_epochs, "1", --trainer.limit_train_batches, "2", --trainer.limit_val_batches, "1",
  --trainer.enable_progress_bar, "false", --trainer.enable_model_summary, "false"]
methods:
  tiny:
    prepare: [[python, -c, {json.dumps(PREPARE)}, "{{protected_dir}}"]]
grid: {{method: [tiny], arch: [fastnet], filter: [none, lowpass-ideal-0.5], seed: [0]}}
""")
    assert S.sweep_main([str(path), "--data-dir", str(tmp_path / "data")]) == 0
    rows = R.collect_results(tmp_path / "work")
    assert [r["filter"] for r in rows] == ["lowpass-ideal-0.5", "none"]
    assert all(0.0 <= r["val_acc"] <= 1.0 and r["epochs"] == 1 and r["num_classes"] == 10 for r in rows)
    for name in ("results.csv", "table.md", "acc_vs_cutoff.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0
    assert "| tiny |" in (tmp_path / "results" / "table.md").read_text()
    # Rerunning resumes: both runs are done, nothing is trained again.
    stamps = [p.stat().st_mtime_ns for p in sorted((tmp_path / "work").glob("runs/*/result.json"))]
    assert S.sweep_main([str(path), "--data-dir", str(tmp_path / "data")]) == 0
    assert stamps == [p.stat().st_mtime_ns for p in sorted((tmp_path / "work").glob("runs/*/result.json"))]


def test_filter_test_set_applies_the_filter_to_both_splits(basic: S.Sweep, tmp_path: Path):
    from dataclasses import replace

    runs = [r for r in S.expand_grid(basic) if r.filter != "none"]
    assert runs
    plain = S.victim_command(basic, runs[0], tmp_path)
    assert "--data.init_args.test_filter" not in plain
    both = S.victim_command(replace(basic, filter_test_set=True), runs[0], tmp_path)
    i = both.index("--data.init_args.test_filter")
    assert both[i + 1] == runs[0].filter == both[both.index("--data.init_args.train_filter") + 1]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_command_of_shipped_sweeps_composes(path: Path, monkeypatch, capsys):
    """Each victim config combination and each prepare command parses (nothing is run)."""
    from fuse_lightning.baselines.cli import build_parser as baseline_parser
    from fuse_lightning.cli import build_cli

    monkeypatch.chdir(REPO)
    sweep = S.load_sweep(path.relative_to(REPO))
    seen: set[tuple[str, str]] = set()
    commands = []
    for run in S.expand_grid(sweep):
        if (run.method, run.arch) not in seen:  # one victim command per method x architecture
            seen.add((run.method, run.arch))
            commands.append(S.victim_command(sweep, run, "data"))
    for name in sweep.grid["method"]:
        method = sweep.methods[name]
        values = {"data_dir": "data", "protected_dir": "p", "method_dir": "m", "work_dir": "w"}
        commands += [S.expand_command(list(words), values) for words in method.prepare]
    for cmd in commands:
        args = cmd[cmd.index("fuse_lightning") + 1:] if "fuse_lightning" in cmd else cmd[1:]
        if args[0] == "fit":
            with pytest.raises(SystemExit) as exit_info:
                build_cli([*args, "--print_config"])
            assert exit_info.value.code in (0, None), cmd
        elif args[0] == "baseline":
            baseline_parser().parse_args(args[1:])
        else:
            raise AssertionError(f"unexpected command {cmd}")
    capsys.readouterr()


# ------------------------------------------------------------------------------ stopping

# A stand-in for a victim: starts a grandchild (like a dataloader worker), writes both pids to
# `<dir>/child.pid` and sleeps.
SLEEPER = """
import os, subprocess, sys, time
from pathlib import Path
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
target = Path(sys.argv[1]) / "child.pid"
target.parent.mkdir(parents=True, exist_ok=True)
target.with_suffix(".tmp").write_text(f"{os.getpid()} {grandchild.pid}")
os.replace(target.with_suffix(".tmp"), target)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an unreaped exit counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_for(paths: list[Path], timeout_s: float = 60.0) -> list[int]:
    import time

    deadline = time.monotonic() + timeout_s
    while not all(p.is_file() for p in paths):
        assert time.monotonic() < deadline, f"children did not start: {paths}"
        time.sleep(0.05)
    return [int(x) for p in paths for x in p.read_text().split()]


def wait_gone(pids: list[int], timeout_s: float = 15.0) -> list[int]:
    import time

    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and signals are POSIX")
def test_sigterm_to_the_sweep_stops_its_children(tmp_path: Path):
    """SIGTERM to `fuse sweep` kills the running prepare command's whole process group."""
    import signal
    import subprocess

    path = write_sweep(tmp_path, f"""
name: stop
results_dir: {tmp_path}/results
work_dir: {tmp_path}/work
victim_configs: [configs/victim_cifar10.yaml]
methods:
  slow:
    prepare: [[python, -c, {json.dumps(SLEEPER)}, "{{method_dir}}"]]
grid: {{method: [slow], arch: [fastnet]}}
""")
    sweep = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fuse_lightning.sweep import sweep_main; "
         "sys.exit(sweep_main(sys.argv[1:]))", str(path), "--data-dir", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        pids = wait_for([tmp_path / "work" / "methods" / "slow" / "child.pid"])
        assert all(alive(p) for p in pids)
        sweep.send_signal(signal.SIGTERM)
        _, err = sweep.communicate(timeout=30)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    assert wait_gone(pids) == []
    assert not (tmp_path / "work" / "methods" / "slow" / "prepare.json").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and signals are POSIX")
def test_ctrl_c_stops_parallel_victims_and_records_nothing(basic: S.Sweep, monkeypatch):
    """Ctrl-C while two victims run (two 'GPUs'): both process groups die, no result is written."""
    import os
    import signal
    import threading

    runs = S.expand_grid(basic)[:3]
    monkeypatch.setattr(S, "victim_command", lambda sweep, run, data_dir: [sys.executable, "-c", SLEEPER, str(run.run_dir)])
    pid_files = [r.run_dir / "child.pid" for r in runs[:2]]
    found: list[int] = []

    def interrupt() -> None:
        found.extend(wait_for(pid_files))
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Thread(target=interrupt, daemon=True)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        S.run_victims(basic, runs, "/d", gpus=["0", "1"], executor=S.execute, log=lambda s: None)
    timer.join(5)
    assert len(found) == 4  # two children, two grandchildren
    assert wait_gone(found) == []
    for run in runs:
        assert not run.result_path.exists() and not (run.run_dir / "failed.json").exists()
    assert not (runs[2].run_dir / "child.pid").exists()  # the queued run never started
    # The stop is over: the next sweep in this process starts children again.
    assert S.execute([sys.executable, "-c", "pass"], runs[2].run_dir / "after.log") == 0
