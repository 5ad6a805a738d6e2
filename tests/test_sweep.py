"""Sweeps and result reporting: spec, validation, commands, resume, stopping, W&B backend, tables, plots."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fuse_lightning import results as R
from fuse_lightning import sweep as SW
from fuse_lightning.callbacks import ResultWriter
from fuse_lightning.sweep import local as L
from fuse_lightning.sweep import spec as S
from fuse_lightning.sweep import wandb_backend as W

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

BASIC = """
name: t
results_dir: TMP/results
work_dir: TMP/work
victim:
  configs: [configs/victim_cifar10.yaml]
  overrides: {trainer.max_epochs: 1}
methods:
  clean: {}
  noise:
    command: baseline
    configs: [configs/baselines/random_cifar10.yaml]
    overrides: {method.init_args.eps: 4, data.init_args.train_subset: 500}
  gen:
    command: fit
    configs: [configs/fuse_cifar10.yaml, configs/fuse_cifar10_cpu.yaml]
    overrides: {model.init_args.rsm.enabled: false, model.init_args.rsm.width_range: [0.1, 0.2]}
grid:
  method: [noise, clean]
  arch: [fastnet, resnet18]
  filter: [none, lowpass-ideal-0.5]
  seed: [0, 1]
"""


def write_sweep(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("TMP", str(tmp_path)))
    return path


@pytest.fixture
def basic(tmp_path: Path) -> S.Sweep:
    return S.load_sweep(write_sweep(tmp_path, BASIC))


def value(cmd: list[str], flag: str) -> str:
    return cmd[len(cmd) - 1 - cmd[::-1].index(flag) + 1]  # the last occurrence wins, like the CLI


# ------------------------------------------------------------------------------ spec, grid, commands


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


def test_spec_is_typed_with_defaults(basic: S.Sweep, tmp_path: Path):
    assert isinstance(basic.spec, S.SweepSpec) and isinstance(basic.spec.victim, S.VictimSpec)
    assert basic.spec.methods["noise"].command == "baseline"
    assert basic.spec.methods["clean"] == S.MethodSpec()
    assert basic.spec.keep_checkpoints is False and basic.spec.wandb == S.WandbSpec()
    assert basic.methods["clean"].protected_dir is None
    assert basic.methods["noise"].method_dir == tmp_path / "work" / "methods" / "noise"
    assert basic.methods["noise"].protected_dir == tmp_path / "work" / "methods" / "noise" / "protected"
    # Fields are overridable like any jsonargparse config.
    moved = S.load_sweep(basic.path, ["--work_dir", str(tmp_path / "w2"), "--grid.seed", "[3]"])
    assert moved.methods["gen"].protected_dir == tmp_path / "w2" / "methods" / "gen" / "protected"
    assert [r.seed for r in S.expand_grid(moved)] == [3] * 8


def test_victim_command(basic: S.Sweep, tmp_path: Path):
    runs = {r.run_id: r for r in S.expand_grid(basic)}
    run = runs["noise__fastnet__lowpass-ideal-0.5__s1"]
    cmd = S.victim_command(basic, run, "/data")
    assert cmd[:4] == [sys.executable, "-m", "fuse_lightning", "fit"]
    assert value(cmd, "--config") == "configs/victim_cifar10.yaml"
    assert value(cmd, "--trainer.max_epochs") == "1"
    assert value(cmd, "--data.init_args.data_dir") == "/data"
    assert value(cmd, "--data.init_args.protected_dir") == str(basic.methods["noise"].protected_dir)
    assert value(cmd, "--data.init_args.train_filter") == "lowpass-ideal-0.5"
    assert value(cmd, "--model.init_args.arch") == "fastnet"
    assert value(cmd, "--seed_everything") == "1"
    assert value(cmd, "--trainer.default_root_dir") == str(run.run_dir)
    assert cmd[-1] == "--trainer.callbacks+=fuse_lightning.callbacks.ResultWriter"
    # The clean set has no protected_dir, and "none" adds no filter flag.
    clean = S.victim_command(basic, runs["clean__resnet18__none__s0"], "/data")
    assert "--data.init_args.protected_dir" not in clean and "--data.init_args.train_filter" not in clean
    assert "--data.init_args.test_filter" not in cmd
    basic.spec.filter_test_set = True  # band maps: train and test on the same band
    assert value(S.victim_command(basic, run, "/data"), "--data.init_args.test_filter") == "lowpass-ideal-0.5"


def test_arch_and_method_victim_overrides(tmp_path: Path):
    text = BASIC.replace(
        "  overrides: {trainer.max_epochs: 1}\n",
        "  overrides: {trainer.max_epochs: 1}\n  arch_overrides: {resnet18: {trainer.max_epochs: 3, model.init_args.lr: 0.01}}\n",
    ).replace("  clean: {}\n", "  clean: {}\n  unseen: {victim_overrides: {data.init_args.exclude_subset: 500, model.init_args.lr: 0.2}}\n")
    sweep = S.load_sweep(write_sweep(tmp_path, text.replace("[noise, clean]", "[noise, unseen]")))
    runs = {r.run_id: r for r in S.expand_grid(sweep)}
    plain = S.victim_command(sweep, runs["noise__fastnet__none__s0"], "/d")
    assert value(plain, "--trainer.max_epochs") == "1" and "--model.init_args.lr" not in plain
    wide = S.victim_command(sweep, runs["noise__resnet18__none__s0"], "/d")
    assert value(wide, "--trainer.max_epochs") == "3" and value(wide, "--model.init_args.lr") == "0.01"
    unseen = S.victim_command(sweep, runs["unseen__resnet18__none__s0"], "/d")  # the method's come last
    assert value(unseen, "--data.init_args.exclude_subset") == "500" and value(unseen, "--model.init_args.lr") == "0.2"
    # Without the new keys, commands (and so the keys of finished runs) are unchanged.
    basic = S.load_sweep(write_sweep(tmp_path, BASIC, "b.yaml"))
    assert S.victim_command(basic, runs["noise__fastnet__none__s0"], "/d") == plain
    bad = write_sweep(tmp_path, text.replace("{resnet18: {", "{resnet9000: {"), "bad.yaml")
    with pytest.raises(S.SweepError, match="arch_overrides.*resnet9000"):
        S.load_sweep(bad)


def test_prepare_commands_derive_every_path(basic: S.Sweep, tmp_path: Path):
    noise, gen = basic.methods["noise"], basic.methods["gen"]
    cmd = S.prepare_command(noise, "/d")
    assert cmd[:4] == [sys.executable, "-m", "fuse_lightning", "baseline"]
    assert value(cmd, "--config") == "configs/baselines/random_cifar10.yaml"
    assert value(cmd, "--method.init_args.eps") == "4" and value(cmd, "--data.init_args.train_subset") == "500"
    assert value(cmd, "--data.init_args.data_dir") == "/d"
    assert value(cmd, "--out") == str(noise.protected_dir)
    cmd = S.prepare_command(gen, "/d")
    assert cmd[3] == "fit" and "--out" not in cmd
    assert value(cmd, "--model.init_args.rsm.enabled") == "false"
    assert value(cmd, "--model.init_args.rsm.width_range") == "[0.1, 0.2]"
    # ProtectOnFitEnd exports to <trainer.default_root_dir>/protected.
    assert value(cmd, "--trainer.default_root_dir") == str(gen.method_dir)
    assert gen.protected_dir == gen.method_dir / "protected"
    assert S.prepare_command(basic.methods["clean"], "/d") is None


def test_portable_commands_name_no_machine_paths(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    words = [sys.executable, "-m", "x", str(tmp_path / "work" / "a"), "/d", "rel/b", "--flag"]
    assert S.portable(words) == ["python", "-m", "x", "work/a", os.path.relpath("/d"), "rel/b", "--flag"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("method: [noise, clean]", "method: [noise, clean, fuse]"), "grid.method"),
        (lambda t: t.replace("lowpass-ideal-0.5]", "lowpass-magic-0.5]"), "grid.filter"),
        (lambda t: t.replace("lowpass-ideal-0.5]", "lowpass-ideal-0.50]"), "should be written"),
        (lambda t: t.replace("arch: [fastnet, resnet18]", "arch: [fastnet, resnet9000]"), "grid.arch"),
        (lambda t: t.replace("seed: [0, 1]", "seed: [0, 0]"), "grid.seed"),
        (lambda t: t.replace("victim:", "victimz:"), "victimz"),
        (lambda t: t.replace("command: baseline", "command: baselin"), "command"),
        (lambda t: t.replace("command: baseline", "command: baseline\n    protected_dir: x"), "methods.noise"),
        (lambda t: t.replace("  clean: {}", "  clean: {configs: [a.yaml]}"), "need a command"),
        (lambda t: t.replace("  clean: {}", "  cl__ean: {}"), "'__'"),
        (lambda t: t.replace("name: t\n", ""), "name"),
        (lambda t: t.replace("name: t\n", "name: a b\n"), "name"),
        (lambda t: t + "compare: [[noise, em]]\n", "compare"),
        (lambda t: t + "compare: [[noise, clean, gen]]\n", "compare"),
        (lambda t: t + "compare: [[noise]]\n", "compare"),
        (lambda t: t + "pools: {noise: [gen]}\n", "pools.noise"),
        (lambda t: t + "pools: {both: [gen, em]}\n", "pools.both"),
        (lambda t: t + "pools: {both: []}\n", "pools.both"),
        (lambda t: t + "pools: {both: [gen, noise]}\ncompare_independent: [[both, lsp]]\n", "compare_independent"),
        (lambda t: t + "compare_independent: [[noise]]\n", "compare_independent"),
    ],
)
def test_validation_errors_name_file_and_key(tmp_path: Path, edit, message: str):
    path = write_sweep(tmp_path, edit(BASIC))
    with pytest.raises(S.SweepError) as info:
        S.load_sweep(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_compare_pairs_may_lie_outside_a_narrowed_grid(tmp_path: Path):
    path = write_sweep(tmp_path, BASIC + "compare: [[noise, gen], [noise, clean]]\n")
    sweep = S.load_sweep(path, ["--grid.method", "[noise]"])  # gen is defined, not in the grid
    assert sweep.spec.compare == [["noise", "gen"], ["noise", "clean"]] and sweep.grid.method == ["noise"]


def test_independent_comparisons_expand_pools(tmp_path: Path):
    path = write_sweep(tmp_path, BASIC + "pools: {gens: [gen, noise]}\n"
                       "compare_independent: [[gens, clean], [noise, clean]]\n")
    assert S.independent_comparisons(S.load_sweep(path)) == [
        ("gens", ["gen", "noise"], "clean", ["clean"]), ("noise", ["noise"], "clean", ["clean"])]


def test_from_sweep_and_existing_protected_dir(tmp_path: Path):
    base = write_sweep(tmp_path, BASIC, "base.yaml")
    other = write_sweep(tmp_path, f"""
name: other
results_dir: TMP/r2
work_dir: TMP/w2
methods:
  clean: {{}}
  noise: {{from_sweep: {base}}}
  fixed: {{protected_dir: TMP/elsewhere}}
grid: {{method: [clean, noise, fixed], arch: [fastnet], filter: [bandpass-ideal-0-0.25]}}
""", "other.yaml")
    sweep = S.load_sweep(other)
    assert sweep.methods["noise"].protected_dir == tmp_path / "work" / "methods" / "noise" / "protected"
    assert sweep.methods["noise"].spec.command == "baseline"  # the command comes along
    assert sweep.methods["fixed"].protected_dir == tmp_path / "elsewhere"
    assert S.prepare_command(sweep.methods["fixed"], "/d") is None
    assert sweep.grid.seed == [0]  # default
    assert [r.run_id for r in S.expand_grid(sweep)][1] == "noise__fastnet__bandpass-ideal-0-0.25__s0"
    loop = write_sweep(tmp_path, BASIC.replace("  clean: {}", "  clean: {from_sweep: TMP/loop.yaml}"), "loop.yaml")
    with pytest.raises(S.SweepError, match="refers back to itself"):
        S.load_sweep(loop)


def test_cli_help_print_config_and_dry_run(basic: S.Sweep, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as info:
        SW.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for words in ("--data_dir", "--dry_run", "--report_only", "--max_runs", "--grid.filter", "Victim architectures"):
        assert words in text
    with pytest.raises(SystemExit) as info:
        SW.main([str(basic.path), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["methods"]["clean"]["command"] is None  # expanded: every field, typed
    assert printed["methods"]["gen"]["overrides"]["model.init_args.rsm.enabled"] is False
    assert printed["grid"]["seed"] == [0, 1]
    assert SW.main([str(basic.path), "--dry_run", "--data_dir", "/d"]) == 0
    out = capsys.readouterr().out
    assert out.count("fuse_lightning fit") == 16 and out.count("fuse_lightning baseline") == 1
    run = S.expand_grid(basic)[0]  # one finished run, made with /d: under /e it would run again
    run.run_dir.mkdir(parents=True)
    run.result_path.write_text(json.dumps({"run_id": run.run_id, "val_acc": 0.5, "data_dir": "/d",
                                           "run_key": S.run_key(basic, run, "/d")}))
    assert SW.main([str(basic.path), "--dry_run", "--data_dir", "/e"]) == 2
    assert "1 finished run(s) were made with another data dir: /d" in capsys.readouterr().err
    assert SW.main([str(basic.path), "--dry_run", "--data_dir", "/e", "--new_data_dir", "true"]) == 0
    assert capsys.readouterr().out.count("fuse_lightning fit") == 16
    assert SW.main([str(basic.path), "--grid.arch", "[nosuchnet]"]) == 2
    assert "grid.arch" in capsys.readouterr().err
    bad = write_sweep(tmp_path, BASIC.replace("  clean: {}", "  clean: {comand: fit}"), "bad.yaml")
    assert SW.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "comand" in err


# ------------------------------------------------------------------------------ execution


class FakeExecutor:
    """Stands in for the children: a victim's ResultWriter writes result.json into its run
    directory; a baseline writes a protected set with its manifest to --out."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd, log_path, env):
        self.calls.append(cmd)
        if "--out" in cmd:
            out = Path(value(cmd, "--out"))
            out.mkdir(parents=True, exist_ok=True)
            (out / "manifest.json").write_text(json.dumps({"cmd": cmd, "files": {"data": out.name}}))
            return 0
        run_dir = Path(value(cmd, "--trainer.default_root_dir"))
        if run_dir.name in self.fail:
            log_path.write_text("Traceback ...\nRuntimeError: boom\n")
            return 3
        seed = int(value(cmd, "--seed_everything"))
        (run_dir / "result.json").write_text(json.dumps(
            {"val_acc": 0.4, "best_val_acc": 0.5 + 0.1 * seed, "train_acc": 0.8, "epochs": 3, "num_classes": 10}))
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
        return 0


def run_ids(calls: list[list[str]]) -> list[str]:
    return [Path(value(c, "--trainer.default_root_dir")).name for c in calls]


def test_finished_runs_are_skipped_and_failures_recorded(basic: S.Sweep, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = [r for r in S.expand_grid(basic) if r.method == "clean" and r.arch == "fastnet"]
    done = runs[0]
    done.run_dir.mkdir(parents=True)
    done.result_path.write_text(json.dumps({"run_id": done.run_id, "val_acc": 0.9,
                                            "run_key": S.run_key(basic, done, "/data")}))
    executor = FakeExecutor(fail={runs[1].run_id})
    summary = L.run_victims(basic, runs, "/data", executor=executor, log=lambda s: None)
    assert run_ids(executor.calls) == [r.run_id for r in runs[1:]]
    assert summary.skipped == 1
    assert [f["run_id"] for f in summary.failed] == [runs[1].run_id]
    assert "boom" in json.loads((runs[1].run_dir / "failed.json").read_text())["tail"]
    assert not runs[1].result_path.exists()
    row = json.loads(runs[3].result_path.read_text())
    assert row["val_acc"] == pytest.approx(0.4) and row["best_val_acc"] == pytest.approx(0.6)
    assert row["num_classes"] == 10 and row["filter"] == "lowpass-ideal-0.5" and row["seed"] == 1
    # Portable: `python`, paths relative to where the sweep runs.
    assert row["command"].startswith("python -m fuse_lightning fit") and str(tmp_path) not in row["command"]
    assert row["data_dir"] == os.path.relpath("/data")
    assert not (runs[3].run_dir / "checkpoints" / "last.ckpt").exists()  # keep_checkpoints: false
    # A rerun executes only the failed run.
    again = FakeExecutor()
    summary = L.run_victims(basic, runs, "/data", executor=again, log=lambda s: None)
    assert len(again.calls) == 1 and summary.skipped == 3 and not summary.failed
    assert not (runs[1].run_dir / "failed.json").exists()


def test_runs_per_gpu_shares_each_gpu_between_that_many_victims(basic: S.Sweep, tmp_path: Path, monkeypatch):
    """`--runs_per_gpu 3` on two GPUs: at most three victims on each GPU at once (six in all),
    every victim pinned to exactly one GPU with Lightning's GPU flags."""
    monkeypatch.chdir(tmp_path)
    runs = S.expand_grid(basic)
    assert len(runs) >= 12
    lock, running, peak, pinned = threading.Lock(), {"0": 0, "1": 0}, {"0": 0, "1": 0}, []

    class Concurrent(FakeExecutor):
        def __call__(self, cmd, log_path, env):
            device = env["CUDA_VISIBLE_DEVICES"]
            with lock:
                pinned.append((device, value(cmd, "--trainer.accelerator"), value(cmd, "--trainer.devices")))
                running[device] += 1
                peak[device] = max(peak[device], running[device])
            time.sleep(0.2)  # long enough for the pool to fill every slot
            with lock:
                running[device] -= 1
            return super().__call__(cmd, log_path, env)

    summary = L.run_victims(basic, runs, "/d", gpus=["0", "1"], executor=Concurrent(), log=lambda s: None,
                            runs_per_gpu=3)
    assert len(summary.finished) == len(runs) and not summary.failed
    assert peak == {"0": 3, "1": 3}
    assert {p[1:] for p in pinned} == {("gpu", "1")} and {p[0] for p in pinned} == {"0", "1"}
    with pytest.raises(ValueError, match="runs_per_gpu"):
        L.run_victims(basic, runs, "/d", gpus=["0"], runs_per_gpu=0, executor=FakeExecutor(), log=lambda s: None)
    assert SW.main([str(basic.path), "--data_dir", "/d", "--runs_per_gpu", "0"]) == 2


def test_each_run_records_the_fingerprint_of_the_set_it_trained_on(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    basic = S.load_sweep(write_sweep(tmp_path, BASIC), ["--grid.arch", "[fastnet]", "--grid.filter", "[none]"])
    runs = S.expand_grid(basic)
    assert L.run_local(basic, "/d", executor=FakeExecutor()) == 0
    rows = {r.run_id: json.loads(r.result_path.read_text()) for r in runs}
    first = rows["noise__fastnet__none__s0"]["protected_fingerprint"]
    assert first and len(first) == 16 and rows["noise__fastnet__none__s1"]["protected_fingerprint"] == first
    assert rows["clean__fastnet__none__s0"]["protected_fingerprint"] is None
    # The set made again with other contents: a run on it records another fingerprint.
    manifest = basic.methods["noise"].protected_dir / "manifest.json"
    manifest.write_text(json.dumps({"files": {"data": "changed"}}))
    run = runs[0]
    row = L.execute_run(basic, run, "/d", executor=FakeExecutor())
    assert row["run_id"] == run.run_id and row["protected_fingerprint"] not in (None, first)


def test_an_interrupted_victim_resumes_from_its_checkpoint_and_counts_every_attempt(basic: S.Sweep, monkeypatch):
    run = S.expand_grid(basic)[0]
    clock = iter([100.0, 160.0, 500.0, 540.0])  # perf_counter at each attempt's start and end
    monkeypatch.setattr(L, "time", types.SimpleNamespace(perf_counter=lambda: next(clock), time=L.time.time))
    calls = []

    def killed_after_an_epoch(cmd, log_path, env):  # the sweep is stopped after the child saved epoch 0
        calls.append(cmd)
        (run.run_dir / "checkpoints").mkdir(exist_ok=True)
        (run.run_dir / "checkpoints" / "last.ckpt").write_bytes(b"epoch 0")
        raise L.SweepInterrupted()

    with pytest.raises(L.SweepInterrupted):
        L.execute_run(basic, run, "/d", executor=killed_after_an_epoch)
    assert "--ckpt_path" not in calls[0] and not run.result_path.exists()
    attempt = json.loads((run.run_dir / "attempt.json").read_text())
    assert attempt == {"run_key": S.run_key(basic, run, "/d"), "earlier_wall_s": 60.0}

    row = L.execute_run(basic, run, "/d", executor=lambda c, p, e: calls.append(c) or FakeExecutor()(c, p, e))
    assert value(calls[1], "--ckpt_path") == str(run.run_dir / "checkpoints" / "last.ckpt")
    assert row["wall_s"] == 60.0 + 40.0  # both attempts
    assert "--ckpt_path" not in row["command"]  # the recorded command reproduces the run from scratch
    assert not (run.run_dir / "attempt.json").exists() and S.result_is_current(basic, run, "/d")


def test_a_victim_restarts_when_its_checkpoint_is_not_this_runs_or_its_child_failed(basic: S.Sweep):
    run = S.expand_grid(basic)[0]
    last = run.run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"other settings")
    (run.run_dir / "attempt.json").write_text(json.dumps({"run_key": "another command", "earlier_wall_s": 900.0}))
    calls = []

    def failing(cmd, log_path, env):
        calls.append(cmd)
        assert not last.exists()  # deleted before the child starts
        last.write_bytes(b"maybe broken")
        return 1

    assert "exit code 1" in L.execute_run(basic, run, "/d", executor=failing)["error"]
    assert "--ckpt_path" not in calls[0]
    # A failed child is not resumed: its checkpoint may be what broke it, so the next attempt starts over.
    assert not last.exists() and not (run.run_dir / "attempt.json").exists()
    row = L.execute_run(basic, run, "/d", executor=lambda c, p, e: calls.append(c) or FakeExecutor()(c, p, e))
    assert "--ckpt_path" not in calls[1] and row["wall_s"] < 900.0


def test_a_run_without_val_acc_fails(basic: S.Sweep):
    run = S.expand_grid(basic)[0]
    row = L.execute_run(basic, run, "/d", executor=lambda cmd, log, env: 0)
    assert "no val/acc" in row["error"] and not run.result_path.exists()


def test_max_runs_limits_pending_runs(basic: S.Sweep):
    executor = FakeExecutor()
    summary = L.run_victims(basic, S.expand_grid(basic), "/d", max_runs=2, executor=executor, log=lambda s: None)
    assert len(executor.calls) == 2 and len(summary.finished) == 2


def test_max_runs_prepares_only_for_the_runs_it_will_run(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sweep = S.load_sweep(write_sweep(tmp_path, BASIC), ["--grid.method", "[clean, noise]"])
    first = FakeExecutor()
    assert L.run_local(sweep, "/d", max_runs=2, executor=first) == 0
    assert not any("--out" in c for c in first.calls)  # the two runs are clean ones: noise is not made
    assert run_ids(first.calls) == [r.run_id for r in S.expand_grid(sweep)[:2]]
    rest = FakeExecutor()
    assert L.run_local(sweep, "/d", executor=rest) == 0
    assert "--out" in rest.calls[0] and sum("--out" in c for c in rest.calls) == 1 and len(rest.calls) == 1 + 14
    # A failed preparation blocks exactly the chosen runs of its method and no other run starts.
    noise_first = S.load_sweep(write_sweep(tmp_path, BASIC.replace("TMP/work", "TMP/work2")
                                           .replace("TMP/results", "TMP/results2")))
    calls = []

    def failing(cmd, log_path, env):
        calls.append(cmd)
        return 1 if "--out" in cmd else FakeExecutor()(cmd, log_path, env)

    assert L.run_local(noise_first, "/d", max_runs=2, executor=failing) == 1
    assert len(calls) == 1 and "--out" in calls[0]
    assert "0 finished" in (out := capsys.readouterr().out) and "2 blocked by a failed prepare" in out


def test_the_report_states_the_wall_time_behind_its_rows(basic: S.Sweep, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"method": "noise", "wall_s": 1800.0}, {"method": "clean", "wall_s": "5400.0"}, {"method": "clean"}]
    assert L.compute_used(basic, rows[1:]) == "Wall time: victims 1.5 h (1 run)."  # clean needs no set
    assert L.compute_used(basic, [{"method": "clean", "wall_s": 90.0}]) == "Wall time: victims 1.5 min (1 run)."
    assert L.compute_used(basic, rows) == ("Wall time: victims 2.0 h (2 runs); making the 1 protected sets: no time "
                                           f"recorded ({L._UNRECORDED}).")
    noise = basic.methods["noise"]
    assert L._prepare_one(noise, "/d", FakeExecutor(), log=lambda s: None)
    record = json.loads(noise.record_path.read_text())
    assert record["wall_s"] >= 0 and "started_unix" not in record
    noise.record_path.write_text(json.dumps(dict(record, wall_s=3600.0)))
    assert "making the protected sets 1.0 h (all 1)." in L.compute_used(basic, rows, "/d")
    assert "making the 1 protected sets: no time recorded" in L.compute_used(basic, rows, "/other")  # not current


def test_the_time_of_a_made_set_outlives_its_work_dir(basic: S.Sweep, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"method": "noise", "wall_s": 1800.0}]
    noise = basic.methods["noise"]
    assert L._prepare_one(noise, "/d", FakeExecutor(), log=lambda s: None)
    noise.record_path.write_text(json.dumps(dict(json.loads(noise.record_path.read_text()), wall_s=900.0)))
    assert L.record_prepare_times(basic, "/d") and not L.record_prepare_times(basic, "/d")  # unchanged: no write
    ledger = json.loads(L.prepare_times_path(basic).read_text())
    assert ledger == {S.prepare_key(noise, "/d"): {"method": "noise", "wall_s": 900.0}}
    shutil.rmtree(basic.work_dir)  # a fresh clone: the work dir is gone, the committed record stays
    assert "making the protected sets 15.0 min (all 1)." in L.compute_used(basic, rows, "/d")
    assert "no time recorded" in L.compute_used(basic, rows, "/other")  # another command: another set
    # Entries that are not a number of seconds are ignored, never evaluated.
    L.prepare_times_path(basic).write_text(json.dumps({S.prepare_key(noise, "/d"): {"wall_s": "900"}}))
    assert "no time recorded" in L.compute_used(basic, rows, "/d")


def test_a_resumed_preparation_counts_the_time_of_the_attempts_before_it(basic: S.Sweep, tmp_path: Path,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    noise = basic.methods["noise"]
    clock = iter([100.0, 130.0, 500.0, 540.0, 900.0, 905.0])  # perf_counter at each attempt's start and end
    monkeypatch.setattr(L, "time", types.SimpleNamespace(perf_counter=lambda: next(clock), time=L.time.time))
    assert not L._prepare_one(noise, "/d", lambda c, p, e: 3, log=lambda s: None)  # fails after 30 s
    assert json.loads(noise.record_path.read_text())["earlier_wall_s"] == 30.0
    assert not S.method_is_current(noise, "/d")

    def killed(cmd, log_path, env):  # the sweep dies with the command: only the record written before it survives
        log_path.write_text("progress\n")
        started = json.loads(noise.record_path.read_text())["started_unix"]
        os.utime(log_path, (started + 200.0, started + 200.0))  # its last output came 200 s after it started
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        L._prepare_one(noise, "/d", killed, log=lambda s: None)
    record = json.loads(noise.record_path.read_text())
    assert record["earlier_wall_s"] == 30.0 + 40.0  # the interrupted attempt's own clock: 540 - 500
    # Had the process been killed outright, the record written at its start counts it until its last output.
    noise.record_path.write_text(json.dumps({**record, "earlier_wall_s": 30.0,
                                             "started_unix": (noise.method_dir / "prepare.log").stat().st_mtime - 200.0}))
    log_path = noise.method_dir / "prepare.log"
    assert L._earlier_attempts_s(noise, record["key"], log_path) == pytest.approx(230.0)
    assert L._earlier_attempts_s(noise, "another command", log_path) == 0.0
    assert L._prepare_one(noise, "/d", FakeExecutor(), log=lambda s: None)  # resumes and finishes in 5 s
    assert json.loads(noise.record_path.read_text())["wall_s"] == pytest.approx(235.0)
    assert S.method_is_current(noise, "/d")


def test_prepare_skips_current_sets_and_reports_failures(basic: S.Sweep):
    calls = []

    def failing(cmd, log_path, env):
        calls.append(cmd)
        return 1

    assert L.prepare_methods(basic, ["clean", "noise"], "/d", failing, log=lambda s: None) == ["noise"]
    assert len(calls) == 1 and calls[0][3] == "baseline"
    prepared = FakeExecutor()
    assert L.prepare_methods(basic, ["clean", "noise"], "/d", prepared, log=lambda s: None) == []
    record = json.loads(basic.methods["noise"].record_path.read_text())
    assert record["key"] == S.prepare_key(basic.methods["noise"], "/d") and record["command"][0] == "python"
    assert L.prepare_methods(basic, ["clean", "noise"], "/d", failing, log=lambda s: None) == []
    assert len(calls) == 1 and len(prepared.calls) == 1
    # A command that succeeds without writing the manifest fails the method.
    assert L.prepare_methods(basic, ["gen"], "/d", lambda c, p, e: 0, log=lambda s: None) == ["gen"]


def test_changed_settings_rerun_stale_runs_and_methods(tmp_path: Path, capsys):
    """Unchanged settings skip finished work; a changed victim or method command redoes it."""
    path = write_sweep(tmp_path, BASIC)
    sweep = S.load_sweep(path)
    runs = [r for r in S.expand_grid(sweep) if r.arch == "fastnet" and r.filter == "none" and r.seed == 0]
    assert [r.method for r in runs] == ["noise", "clean"]
    executor = FakeExecutor()
    assert L.prepare_methods(sweep, ["noise", "clean"], "/d", executor, log=lambda s: None) == []
    L.run_victims(sweep, runs, "/d", executor=executor, log=lambda s: None)
    assert len(executor.calls) == 3 and all(S.result_is_current(sweep, r, "/d") for r in runs)

    # Same settings: nothing is prepared or run again.
    again = FakeExecutor()
    assert L.prepare_methods(sweep, ["noise", "clean"], "/d", again, log=lambda s: None) == []
    summary = L.run_victims(sweep, runs, "/d", executor=again, log=lambda s: None)
    assert again.calls == [] and summary.skipped == 2
    assert [r["run_id"] for r in L.sweep_rows(sweep, "/d")] == [r.run_id for r in runs]

    # Another victim override: both results are stale; the report leaves them out and says so.
    path.write_text(path.read_text().replace("trainer.max_epochs: 1", "trainer.max_epochs: 2"))
    changed = S.load_sweep(path)
    assert not any(S.result_is_current(changed, r, "/d") for r in runs)
    rows, stale = L.split_results(changed, "/d")
    assert rows == [] and stale == [r.run_id for r in runs]
    L.write_sweep_report(changed, log=print, data_dir="/d")
    assert "2 stale result(s) left out" in capsys.readouterr().out
    rerun = FakeExecutor()
    summary = L.run_victims(changed, runs, "/d", executor=rerun, log=lambda s: None)
    assert len(rerun.calls) == 2 and summary.stale == 2 and summary.skipped == 0
    assert value(rerun.calls[0], "--trainer.max_epochs") == "2"
    assert all(S.result_is_current(changed, r, "/d") for r in runs)
    assert not S.result_is_current(sweep, runs[0], "/d")  # the old settings' result is gone
    # Without a data dir the report compares with the one each result recorded.
    assert len(L.sweep_rows(changed)) == 2 and L.sweep_rows(changed, "/elsewhere") == []

    # Another method override: the method is prepared again (old set moved aside) and its runs
    # are stale although their victim command is the same; the clean run stays done.
    path.write_text(path.read_text().replace("method.init_args.eps: 4", "method.init_args.eps: 6"))
    reprepared = S.load_sweep(path)
    noise_run, clean_run = runs
    assert S.victim_command(reprepared, noise_run, "/d") == S.victim_command(changed, noise_run, "/d")
    assert not S.method_is_current(reprepared.methods["noise"], "/d")
    assert not S.result_is_current(reprepared, noise_run, "/d") and S.result_is_current(reprepared, clean_run, "/d")
    prepared = FakeExecutor()
    assert L.prepare_methods(reprepared, ["noise", "clean"], "/d", prepared, log=lambda s: None) == []
    assert value(prepared.calls[0], "--method.init_args.eps") == "6"
    protected = reprepared.methods["noise"].protected_dir
    assert (protected.with_name(protected.name + ".stale") / "manifest.json").is_file()
    assert S.method_is_current(reprepared.methods["noise"], "/d")
    last = FakeExecutor()
    L.run_victims(reprepared, runs, "/d", executor=last, log=lambda s: None)
    assert run_ids(last.calls) == [noise_run.run_id]


def test_results_without_a_key_are_stale(basic: S.Sweep):
    run = S.expand_grid(basic)[0]
    run.run_dir.mkdir(parents=True)
    run.result_path.write_text(json.dumps({"run_id": run.run_id, "val_acc": 0.5, "data_dir": "/d"}))
    assert not S.result_is_current(basic, run, "/d") and not S.result_is_current(basic, run, None)
    run.result_path.write_text("{not json")
    assert S.read_result(run) is None and L.split_results(basic, "/d") == ([], [run.run_id])


def test_rows_replaced_by_runs_on_a_set_made_again_are_kept_apart(basic: S.Sweep, tmp_path: Path, monkeypatch):
    """A set made again that comes out different: its victims' new rows replace the old ones in
    results.csv, the old rows go to results_superseded.csv (once, however often the report is
    written) and table.md gives each set's accuracy side by side."""
    monkeypatch.chdir(tmp_path)
    assert L.run_local(basic, "/d", executor=FakeExecutor()) == 0
    before = {r["run_id"]: r for r in R.read_csv_rows(tmp_path / "results" / "results.csv")}
    old_set = before["noise__fastnet__none__s0"]["protected_fingerprint"]
    assert old_set and L.superseded_path(basic).exists() is False
    remade = [r for r in S.expand_grid(basic) if r.method == "noise" and r.arch == "fastnet"]
    for run in remade:  # the victims of the new set: another fingerprint, another accuracy
        result = json.loads(run.result_path.read_text())
        result.update(protected_fingerprint="0e12000000000000", val_acc=0.1 + 0.05 * run.seed)
        run.result_path.write_text(json.dumps(result))

    L.write_sweep_report(basic, log=lambda s: None, data_dir="/d")
    after = {r["run_id"]: r for r in R.read_csv_rows(tmp_path / "results" / "results.csv")}
    superseded = R.read_csv_rows(L.superseded_path(basic))
    assert sorted(r["run_id"] for r in superseded) == sorted(r.run_id for r in remade)
    assert all(r["protected_fingerprint"] == old_set and r["val_acc"] == pytest.approx(0.4) for r in superseded)
    assert all(after[r.run_id]["protected_fingerprint"] == "0e12000000000000" for r in remade)
    assert len(after) == len(before) == 16
    text = (tmp_path / "results" / "table.md").read_text()
    made_again = text.split("## Sets made again")[1]
    # fastnet, none: seeds 0 and 1 at 10 % and 15 % on the new set, 40 % on the old one.
    assert "| fastnet | noise | `0e12000000000000` (in results.csv) | 12.5 ± 3.5 (n=2) | 12.5 ± 3.5 (n=2) |" in made_again
    assert f"| fastnet | noise | `{old_set}` (superseded) | 40.0 ± 0.0 (n=2) | 40.0 ± 0.0 (n=2) |" in made_again
    assert "resnet18" not in made_again.split("## Set-level")[0] and "clean" not in made_again.split("## Set-level")[0]
    # Set level: noise's two fastnet sets (12.5 and 40 %) against clean's two runs (40 % each).
    compared = S.load_sweep(basic.path, ["--compare", "[[noise, clean]]"])
    L.write_sweep_report(compared, log=lambda s: None, data_dir="/d")
    set_level = (tmp_path / "results" / "table.md").read_text().split("## Set-level differences")[1]
    fastnet_none = next(line for line in set_level.splitlines() if line.startswith("| none |"))
    assert "| -13.8 [" in fastnet_none and "(2, 2)" in fastnet_none
    assert (tmp_path / "results" / "set_means.png").stat().st_size > 1000

    L.write_sweep_report(basic, log=lambda s: None, data_dir="/d")  # again: nothing new leaves
    assert len(R.read_csv_rows(L.superseded_path(basic))) == len(remade)
    # Other victim settings drop every row: they are kept too, but no set is compared on them.
    changed = S.load_sweep(basic.path, ["--victim.overrides", "{trainer.max_epochs: 2}"])
    L.write_sweep_report(changed, log=lambda s: None, data_dir="/d")
    assert len(R.read_csv_rows(L.superseded_path(basic))) == len(remade) + 16
    # An unreadable record stops the report with the file's name instead of being overwritten.
    L.superseded_path(basic).write_bytes(b"run_id,val_acc\n\xff\xfe,1\n")
    with pytest.raises(S.SweepError, match="results_superseded.csv: cannot read"):
        L.write_sweep_report(changed, log=lambda s: None, data_dir="/d")


def test_the_committed_results_csv_keeps_finished_runs(basic: S.Sweep, tmp_path: Path, monkeypatch):
    """Work dirs are not committed, results.csv is: on a fresh clone (no work dir) its rows with
    the current run_key count as done, are reported again with their numbers, and no protected
    set is made again for them; a row of other settings, or a missing row, is run."""
    import shutil

    monkeypatch.chdir(tmp_path)
    first = FakeExecutor()
    assert L.run_local(basic, "/d", executor=first) == 0
    assert sum("--out" in c for c in first.calls) == 1 and len(first.calls) == 1 + 16
    csv_path = tmp_path / "results" / "results.csv"
    before = csv_path.read_text()
    shutil.rmtree(tmp_path / "work")

    run = S.expand_grid(basic)[3]
    row = S.current_result(basic, run, "/d")
    assert row["run_id"] == run.run_id and row["seed"] == run.seed == 1 and row["val_acc"] == pytest.approx(0.4)
    assert row["best_val_acc"] == pytest.approx(0.6) and row["epochs"] == 3 and row["filter"] == run.filter
    assert not S.result_is_current(basic, run, "/elsewhere")  # another data dir: another command
    again = FakeExecutor()
    assert L.run_local(basic, "/d", executor=again) == 0
    assert again.calls == [] and csv_path.read_text() == before
    assert "16 of 16 runs finished" in (tmp_path / "results" / "table.md").read_text()
    # The same runs under another data dir would all run again: refused, naming the recorded one,
    # dry run included, unless asked for.
    for dry in (False, True):
        with pytest.raises(S.SweepError, match=r"16 finished run\(s\) were made with another data dir: \S*/d \(16 run"):
            L.run_local(basic, "/copy", dry_run=dry, executor=FakeExecutor())
    assert csv_path.read_text() == before
    moved = FakeExecutor()
    assert L.run_local(basic, "/copy", executor=moved, new_data_dir=True) == 0
    assert len(moved.calls) == 1 + 16 and value(moved.calls[1], "--data.init_args.data_dir") == "/copy"
    assert L.run_local(basic, "/copy", executor=FakeExecutor()) == 0  # now recorded with /copy
    csv_path.write_text(before)
    shutil.rmtree(tmp_path / "work")  # back to the fresh clone: only the /d record

    # One noise row missing: the noise set is made again for it and that one victim runs.
    lines = before.splitlines(keepends=True)
    missing = next(i for i, line in enumerate(lines) if line.startswith("noise__resnet18__none__s1,"))
    csv_path.write_text("".join(lines[:missing] + lines[missing + 1:]))
    one = FakeExecutor()
    assert L.run_local(basic, "/d", executor=one) == 0
    assert "--out" in one.calls[0] and run_ids(one.calls[1:]) == ["noise__resnet18__none__s1"]
    assert len(csv_path.read_text().splitlines()) == 17

    # Other victim settings: every recorded row is stale, nothing counts as done.
    changed = S.load_sweep(basic.path, ["--victim.overrides", "{trainer.max_epochs: 2}"])
    assert L.split_results(changed, "/d")[0] == [] and not S.result_is_current(changed, run, "/d")
    said = []
    L.write_sweep_report(changed, log=said.append, data_dir="/d")
    assert any("16 row(s) of" in line and "leave it: not current" in line for line in said)

    # An unreadable record is an error naming the file, not an empty record.
    csv_path.write_bytes(b"run_id,run_key\n\xff\xfe,\x00\n")
    with pytest.raises(S.SweepError, match="results.csv: cannot read"):
        S.recorded_results(basic)


def test_a_set_another_method_reads_is_prepared_for_it(tmp_path: Path):
    text = BASIC.replace("grid:", "  seen:\n    protected_dir: TMP/work/methods/noise/protected\ngrid:")
    sweep = S.load_sweep(write_sweep(tmp_path, text), ["--grid.method", "[seen]"])
    runs = S.expand_grid(sweep)
    assert L.methods_to_prepare(sweep, runs) == ["noise", "seen"]
    assert L.methods_to_prepare(S.load_sweep(write_sweep(tmp_path, BASIC)), []) == []


def test_result_writer_reads_callback_metrics(tmp_path: Path):
    writer = ResultWriter()
    trainer = types.SimpleNamespace(sanity_checking=True, callback_metrics={"val/acc": torch.tensor(0.9)},
                                    default_root_dir=str(tmp_path))
    writer.on_validation_end(trainer, None)  # the sanity check does not count
    trainer.sanity_checking = False
    for acc in (0.2, 0.61, 0.55):
        trainer.callback_metrics = {"val/acc": torch.tensor(acc), "train/acc": torch.tensor(acc + 0.1),
                                    "hist": torch.zeros(3)}
        writer.on_validation_end(trainer, None)
    restored = ResultWriter()
    restored.load_state_dict(writer.state_dict())  # survives a resume from a checkpoint
    restored.on_fit_end(trainer, types.SimpleNamespace(hparams={"num_classes": 10}))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["val_acc"] == pytest.approx(0.55) and result["best_val_acc"] == pytest.approx(0.61)
    assert result["train_acc"] == pytest.approx(0.65) and result["epochs"] == 3 and result["num_classes"] == 10
    assert set(result["metrics"]) == {"val/acc", "train/acc"}  # scalars only
    assert not list(tmp_path.glob(".result.json.tmp*"))
# ------------------------------------------------------------------------------ W&B backend


def fake_artifacts(monkeypatch, tmp_path: Path) -> dict[str, list]:
    """A stand-in for fuse_lightning.wandb_artifacts: logs into a folder, fetches by copying."""
    import shutil

    calls: dict[str, list] = {"log": [], "fetch": []}
    store = tmp_path / "artifact-store"

    def log_protected_set(protected_dir, name, *, project=None, run=None, aliases=()):
        version = sum(1 for c in calls["log"] if c[1] == name)
        calls["log"].append((str(protected_dir), name, project))
        shutil.copytree(protected_dir, store / f"{name}-v{version}")
        return f"{name}:v{version}"

    def fetch_protected_set(ref, dest, *, project=None, run=None):
        calls["fetch"].append((ref, str(dest)))
        shutil.copytree(store / ref.replace(":", "-"), dest, dirs_exist_ok=True)
        return Path(dest)

    module = types.ModuleType("fuse_lightning.wandb_artifacts")
    module.log_protected_set, module.fetch_protected_set = log_protected_set, fetch_protected_set
    monkeypatch.setitem(sys.modules, "fuse_lightning.wandb_artifacts", module)
    return calls


def test_wandb_sweep_config_matches_the_logged_metric(basic: S.Sweep):
    cfg = W.sweep_config(basic, {"noise": "t-noise:v0"})
    assert cfg["method"] == "grid" and cfg["metric"] == {"name": "val/acc", "goal": "minimize"}
    assert cfg["parameters"]["seed"]["values"] == [0, 1]
    assert cfg["parameters"]["protected_sets"] == {"value": {"noise": "t-noise:v0"}}
    assert cfg["command"][-3:] == ["--backend", "wandb", "--agent_run"]
    run = S.expand_grid(basic)[0]
    args = W.logger_args(basic, run)
    assert value(args, "--config") == "configs/logger/wandb.yaml"
    assert value(args, "--trainer.logger.init_args.group") == "t"
    assert json.loads(value(args, "--trainer.logger.init_args.tags")) == ["noise", "fastnet", "none"]


def test_wandb_agent_trial_fetches_the_artifact(basic: S.Sweep, tmp_path: Path, monkeypatch):
    calls = fake_artifacts(monkeypatch, tmp_path)
    assert L.prepare_methods(basic, ["noise"], "/d", FakeExecutor(), log=lambda s: None) == []
    ref = sys.modules["fuse_lightning.wandb_artifacts"].log_protected_set(basic.methods["noise"].protected_dir, "t-noise")
    params = tmp_path / "config-run1.yaml"
    params.write_text("wandb_version: 1\n\n" + yaml.safe_dump({
        "method": {"value": "noise"}, "arch": {"value": "resnet18"}, "filter": {"value": "none"},
        "seed": {"value": 1}, "protected_sets": {"value": {"noise": ref}}}))
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    executor = FakeExecutor()
    assert W.agent_trial(basic, "/d", executor) == 0
    (cmd,) = executor.calls
    local = basic.work_dir / "artifacts" / "t-noise-v0"
    assert calls["fetch"] == [(ref, str(local))]
    assert value(cmd, "--data.init_args.protected_dir") == str(local)
    assert value(cmd, "--trainer.logger.init_args.name") == "noise__resnet18__none__s1"
    run = next(r for r in S.expand_grid(basic) if r.run_id == "noise__resnet18__none__s1")
    assert json.loads(run.result_path.read_text())["val_acc"] == pytest.approx(0.4)
    monkeypatch.delenv("WANDB_SWEEP_PARAM_PATH")
    with pytest.raises(S.SweepError, match="wandb agent"):
        W.agent_params()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs wandb")
def test_wandb_backend_offline_walks_the_grid(tmp_path: Path, monkeypatch, capsys):
    """Offline there is no sweep server: the launcher publishes each set once and runs every
    point as an agent would (victims with the W&B logger), then logs the summary run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls = fake_artifacts(monkeypatch, tmp_path)
    sweep = S.load_sweep(write_sweep(tmp_path, BASIC), ["--grid.arch", "[fastnet]", "--grid.seed", "[0]"])
    executor = FakeExecutor()
    assert W.run(sweep, "/d", executor=executor) == 0
    victims = [c for c in executor.calls if "--out" not in c]
    assert len(victims) == 4 and all(value(c, "--trainer.logger.init_args.group") == "t" for c in victims)
    assert [c[1] for c in calls["log"]] == ["t-noise"]
    refs = json.loads((sweep.work_dir / W.ARTIFACTS_FILE).read_text())
    assert refs["noise"]["ref"] == "t-noise:v0"
    assert "| noise |" in (sweep.results_dir / "table.md").read_text()
    assert list((sweep.work_dir / "wandb").glob("offline-run-*"))  # the summary run
    # Resuming: nothing is prepared, logged or trained again; the report sees every result.
    again = FakeExecutor()
    assert W.run(sweep, "/d", executor=again) == 0
    assert again.calls == [] and len(calls["log"]) == 1
    assert len(L.sweep_rows(W.from_artifacts(sweep, W.recorded_refs(sweep)), "/d")) == 4
    # The same finished runs under another data dir spelling: refused before anything is prepared,
    # unless asked for; then the four victims run again on the new dir.
    moved = FakeExecutor()
    with pytest.raises(S.SweepError, match=r"4 finished run\(s\) were made with another data dir: \S*/d \(4 run"):
        W.run(sweep, "/copy", executor=moved)
    assert moved.calls == []
    assert W.run(sweep, "/copy", executor=moved, new_data_dir=True) == 0
    victims = [c for c in moved.calls if "--out" not in c]
    assert len(victims) == 4 and all(value(c, "--data.init_args.data_dir") == "/copy" for c in victims)


def test_the_package_imports_without_wandb():
    code = ("import sys; sys.modules['wandb'] = None; import fuse_lightning.sweep.wandb_backend as W; "
            "from fuse_lightning.sweep import main; assert W.is_offline() in (True, False)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


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

SHIPPED = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_sweeps_load_expand_validate(path: Path, monkeypatch):
    monkeypatch.chdir(REPO)  # paths in sweep files are relative to the repository root
    sweep = S.load_sweep(path.relative_to(REPO))
    runs = S.expand_grid(sweep)
    assert runs and len(runs) == np.prod([len(getattr(sweep.grid, k)) for k in S.GRID_KEYS])
    assert S.missing_files(sweep) == []
    for name in sweep.grid.method:
        m = sweep.methods[name]
        # Every method trains on the clean set, says how its protected set is made, or reuses the
        # set of a method that the grid prepares before it.
        if m.protected_dir is not None and m.spec.command is None:
            earlier = [sweep.methods[o] for o in sweep.grid.method[: sweep.grid.method.index(name)]]
            assert any(o.spec.command and o.protected_dir == m.protected_dir for o in earlier), name
        if m.spec.command == "fit":  # the export lands where the sweep looks for it
            assert m.protected_dir == m.method_dir / "protected"
    assert S.victim_command(sweep, runs[-1], "data")[3] == "fit"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_command_of_shipped_sweeps_composes(path: Path, monkeypatch, capsys):
    """Each victim command (also with the W&B logger) and each method command parses (nothing runs)."""
    from fuse_lightning.baselines.cli import build_parser as baseline_parser
    from fuse_lightning.cli import build_cli

    monkeypatch.chdir(REPO)
    sweep = S.load_sweep(path.relative_to(REPO))
    seen: set[str] = set()
    commands = []
    for run in S.expand_grid(sweep):
        if not {run.method, run.arch} <= seen:  # every method and every architecture once
            seen |= {run.method, run.arch}
            commands.append(S.victim_command(sweep, run, "data"))
    commands.append(S.victim_command(sweep, run, "data") + W.logger_args(sweep, run))
    order = [sweep.methods[m] for m in sweep.grid.method]  # prepared in this order
    prepared_at = [None] * len(commands)  # a prepare command's position in `order`
    for i, method in enumerate(order):
        if method.spec.command:
            commands.append(S.prepare_command(method, "data"))
            prepared_at.append(i)
    for cmd, position in zip(commands, prepared_at, strict=True):
        args = cmd[cmd.index("fuse_lightning") + 1:]
        if args[0] == "fit":
            with pytest.raises(SystemExit) as exit_info:
                build_cli([*args, "--print_config"])
            assert exit_info.value.code in (0, None), cmd
        elif args[0] == "protect":
            # Its checkpoint is written by a `fit` method of the grid that is prepared before it.
            ckpt = (REPO / args[args.index("--ckpt") + 1]).resolve()
            owner = next(i for i, m in enumerate(order) if m.method_dir and m.spec.command == "fit"
                         and ckpt.is_relative_to(Path(m.method_dir).resolve()))
            assert owner < position, cmd
        else:
            assert args[0] == "baseline", cmd
            baseline_parser().parse_args(args[1:])
    printed = capsys.readouterr().out
    assert "ResultWriter" in printed and "WandbLogger" in printed


# ------------------------------------------------------------------------------ end to end


@pytest.mark.skipif(importlib.util.find_spec("fuse_lightning.data") is None, reason="needs fuse_lightning.data")
def test_tiny_sweep_end_to_end(tmp_path: Path, tiny_cifar10: Path, monkeypatch):
    """A real baseline and two real victims on a tiny data set, through `fuse sweep`; then resume."""
    monkeypatch.chdir(REPO)
    quick = "{data.init_args.check_counts: false, data.init_args.download: false}"
    path = write_sweep(tmp_path, f"""
name: tiny
results_dir: TMP/results
work_dir: TMP/work
victim:
  configs: [configs/victim_cifar10.yaml]
  overrides: {{data.init_args.check_counts: false, data.init_args.download: false, data.init_args.batch_size: 32,
    data.init_args.train_subset: null, data.init_args.test_subset: null, trainer.max_epochs: 1,
    trainer.limit_train_batches: 2, trainer.limit_val_batches: 1, trainer.enable_progress_bar: false,
    trainer.enable_model_summary: false}}
methods:
  random: {{command: baseline, configs: [configs/baselines/random_cifar10.yaml], overrides: {quick}}}
grid: {{method: [random], arch: [fastnet], filter: [none, lowpass-ideal-0.5], seed: [0]}}
""")
    assert SW.main([str(path), "--data_dir", str(tiny_cifar10)]) == 0
    rows = R.collect_results(tmp_path / "work")
    assert [r["filter"] for r in rows] == ["lowpass-ideal-0.5", "none"]
    assert all(0.0 <= r["val_acc"] <= 1.0 and r["epochs"] == 1 and r["num_classes"] == 10 for r in rows)
    assert all(r["command"].startswith("python -m fuse_lightning fit") for r in rows)
    for name in ("results.csv", "table.md", "acc_vs_cutoff.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0
    assert "| random |" in (tmp_path / "results" / "table.md").read_text()
    # Rerunning resumes: both runs are done, nothing is prepared or trained again.
    stamps = [p.stat().st_mtime_ns for p in sorted((tmp_path / "work").glob("**/*.json"))]
    assert SW.main([str(path), "--data_dir", str(tiny_cifar10)]) == 0
    assert stamps == [p.stat().st_mtime_ns for p in sorted((tmp_path / "work").glob("**/*.json"))]


# ------------------------------------------------------------------------------ stopping

# A stand-in for a child: starts a grandchild (like a dataloader worker), writes both pids to
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
    """SIGTERM to `fuse sweep` kills the running method command's whole process group."""
    import signal

    path = write_sweep(tmp_path, """
name: stop
results_dir: TMP/results
work_dir: TMP/work
victim: {configs: [configs/victim_cifar10.yaml]}
methods:
  slow: {command: baseline}
grid: {method: [slow], arch: [fastnet]}
""")
    script = ("import sys; from fuse_lightning.sweep import local, main; "
              f"local.S.prepare_command = lambda m, d: [sys.executable, '-c', {SLEEPER!r}, str(m.method_dir)]; "
              "sys.exit(main(sys.argv[1:]))")
    sweep = subprocess.Popen([sys.executable, "-c", script, str(path), "--data_dir", str(tmp_path)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    record = json.loads((tmp_path / "work" / "methods" / "slow" / "prepare.json").read_text())
    assert "wall_s" not in record and record["earlier_wall_s"] > 0  # unfinished: its time kept


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and signals are POSIX")
def test_ctrl_c_stops_parallel_victims_and_records_nothing(basic: S.Sweep, monkeypatch):
    """Ctrl-C while two victims run (two 'GPUs'): both process groups die, no result is written."""
    import signal
    import threading

    runs = S.expand_grid(basic)[:3]
    monkeypatch.setattr(S, "victim_command", lambda sweep, run, data_dir: [sys.executable, "-c", SLEEPER, str(run.run_dir)])
    pid_files = [r.run_dir / "child.pid" for r in runs[:2]]
    found: list[int] = []
    problems: list[BaseException] = []

    def interrupt() -> None:
        # Ctrl-C comes in any case: a helper that failed silently would leave the sweep running
        # its sleepers to the end; its failure is reported by the main thread below.
        try:
            found.extend(wait_for(pid_files, timeout_s=120))
        except BaseException as err:  # noqa: BLE001
            problems.append(err)
        finally:
            os.kill(os.getpid(), signal.SIGINT)

    # A shell's background job (`cmd &`) starts with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give this test the terminal's Ctrl-C wherever it runs.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer = threading.Thread(target=interrupt, daemon=True)
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            L.run_victims(basic, runs, "/d", gpus=["0", "1"], executor=L.execute, log=lambda s: None)
        timer.join(5)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not problems, problems
    assert len(found) == 4  # two children, two grandchildren
    assert wait_gone(found) == []
    for run in runs:
        assert not run.result_path.exists() and not (run.run_dir / "failed.json").exists()
    assert not (runs[2].run_dir / "child.pid").exists()  # the queued run never started
    # The stop is over: the next sweep in this process starts children again.
    assert L.execute([sys.executable, "-c", "pass"], runs[2].run_dir / "after.log") == 0


def test_a_narrowed_pass_reports_the_files_whole_grid(basic: S.Sweep, tmp_path: Path, monkeypatch):
    """`--grid.method [clean]` runs only clean's victims, but the report keeps every finished
    run of the file's grid (and adds points the command line brings in, e.g. a new seed)."""
    monkeypatch.chdir(tmp_path)
    L.run_victims(basic, S.expand_grid(basic), "/d", executor=FakeExecutor(), log=lambda s: None)
    narrowed = S.load_sweep(basic.path, ["--grid.method", "[clean]", "--grid.seed", "[0, 7]"])
    report = S.with_grid(narrowed, S.union_grid(basic.grid, narrowed.grid))
    assert report.grid.method == ["noise", "clean"] and report.grid.seed == [0, 1, 7]
    assert report.grid.arch == ["fastnet", "resnet18"] and narrowed.grid.method == ["clean"]
    executor = FakeExecutor()
    assert L.run_local(narrowed, "/d", executor=executor, report=report) == 0
    assert {value(c, "--seed_everything") for c in executor.calls} == {"7"}  # only the new seed ran
    ids = [line.split(",")[0] for line in (tmp_path / "results" / "results.csv").read_text().splitlines()[1:]]
    assert sum(i.startswith("noise__") for i in ids) == 8
    assert sum(i.startswith("clean__") for i in ids) == 12  # 2 archs x 2 filters x 3 seeds
    # --report_only through the CLI: the same whole-grid report, whatever the narrowing
    (tmp_path / "results" / "results.csv").unlink()
    assert SW.main([str(basic.path), "--report_only", "--grid.method", "[clean]", "--data_dir", "/d"]) == 0
    ids = [line.split(",")[0] for line in (tmp_path / "results" / "results.csv").read_text().splitlines()[1:]]
    assert sum(i.startswith("noise__") for i in ids) == 8


def test_a_cell_given_more_seeds_keeps_them_in_later_reports(basic: S.Sweep, tmp_path: Path, monkeypatch):
    """Passes that give one cell seeds the grid does not list (`--grid.seed [5]`) put them in
    results.csv, after the cell's grid seeds; later reports that do not name those seeds keep
    them, from the work dir or, once it is gone, from results.csv alone, and drop them like any
    other row when the victim settings change."""
    monkeypatch.chdir(tmp_path)
    L.run_victims(basic, S.expand_grid(basic), "/d", executor=FakeExecutor(), log=lambda s: None)
    cell = ["--grid.method", "[clean]", "--grid.arch", "[resnet18]", "--grid.filter", "[none]"]
    for seed in (5, 3):
        narrowed = S.load_sweep(basic.path, [*cell, "--grid.seed", f"[{seed}]"])
        executor = FakeExecutor()
        report = S.with_grid(narrowed, S.union_grid(basic.grid, narrowed.grid))
        assert L.run_local(narrowed, "/d", executor=executor, report=report) == 0
        assert run_ids(executor.calls) == [f"clean__resnet18__none__s{seed}"]
    beyond = lambda sweep: [r.run_id for r in S.runs_with_extra_seeds(sweep) if r.seed not in (0, 1)]  # noqa: E731
    assert beyond(basic) == ["clean__resnet18__none__s3", "clean__resnet18__none__s5"]
    assert len(S.runs_with_extra_seeds(basic)) == 16 + 2
    expected = [f"clean__resnet18__none__s{s}" for s in (0, 1, 3, 5)]

    def report_ids() -> list[str]:
        assert SW.main([str(basic.path), "--report_only", "--data_dir", "/d"]) == 0  # the file's grid, seeds [0, 1]
        return [line.split(",")[0] for line in (tmp_path / "results" / "results.csv").read_text().splitlines()[1:]]

    ids = report_ids()
    assert len(ids) == 16 + 2 and [i for i in ids if i.startswith("clean__resnet18__none__")] == expected
    assert ids.index("clean__resnet18__none__s5") + 1 == ids.index("clean__resnet18__lowpass-ideal-0.5__s0")
    table = (tmp_path / "results" / "table.md").read_text()
    assert "16 of 16 runs finished, plus 2 at victim seeds beyond the grid's" in table
    assert "| clean | " in table and "(n=4)" in table  # the cell's mean is over its four seeds

    shutil.rmtree(tmp_path / "work")  # a fresh clone: results.csv is the only record
    assert report_ids() == ids

    changed = S.load_sweep(basic.path, ["--victim.overrides", "{trainer.max_epochs: 2}"])
    assert len(beyond(changed)) == 2 and L.split_results(changed, "/d") == ([], [])
