"""Evaluation sweeps: protect a training set with every method, train victims on it, tabulate.

A sweep file (`configs/sweeps/*.yaml`, docs/evaluation.md) is a typed `SweepSpec`: each method
names the command that makes its protected set (`fit`, `baseline` or `protect`) by config files
plus dotted overrides, the victim likewise, and a grid over method x architecture x attacker
filter x seed. Every grid point is one victim `fit` in `<work_dir>/runs/<run_id>/`, whose
ResultWriter callback writes `result.json`; the sweep adds the `run_key` (a hash of the command),
so a rerun skips finished runs and redoes runs whose settings changed. The results become
`results.csv`, `table.md` and plots (`fuse_lightning.results`).

    fuse sweep configs/sweeps/cifar10_cpu.yaml --data_dir ../shared/data [--dry_run] [--backend wandb]
    fuse sweep configs/sweeps/cifar10_cpu.yaml --print_config

Backends: `local` (`local.py`) runs victims here, one at a time on CPU or `--runs_per_gpu` (default 1) per GPU;
`wandb` (`wandb_backend.py`) serves a W&B grid sweep whose victims log live.
"""

from __future__ import annotations

import os
import signal
import sys
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from jsonargparse import ActionYesNo, ArgumentParser, Namespace
from jsonargparse.typing import PositiveInt

from fuse_lightning.sweep.local import run_local, stop_children_on_exit, write_sweep_report
from fuse_lightning.sweep.spec import (
    Sweep,
    SweepError,
    load_sweep,
    missing_files,
    resolve,
    spec_from,
    spec_parser,
    union_grid,
    with_grid,
)

__all__ = ["SweepError", "build_parser", "load_sweep", "main", "run_local", "sweep_main"]


def build_parser(**kwargs) -> ArgumentParser:
    """The parser of `fuse sweep FILE [options]`: the sweep's fields, then how to run it."""
    parser = spec_parser(
        prog="fuse sweep", usage="fuse sweep FILE [--data_dir D] [--backend local|wandb] [--dry_run] ...",
        description="Run an evaluation sweep: prepare the protected sets, train victims over the grid "
        "(finished runs are skipped), write results.csv, table.md and plots. Any field of the sweep "
        "file can be overridden after FILE, e.g. --work_dir outputs/x --grid.seed [0,1].", **kwargs)
    group = parser.add_argument_group("Running the sweep")
    group.add_argument("--data_dir", type=str | None, default=None,
                       help="Dataset root (parent of cifar-10-batches-py); default $FUSE_DATA_DIR, else "
                       "'data' (with --report_only: the one each result was made with).")
    group.add_argument("--backend", type=Literal["local", "wandb"], default="local",
                       help="local: here, one victim per GPU (see --runs_per_gpu; one at a time on CPU); wandb: a W&B "
                       "grid sweep served by agents, victims logging live.")
    for flag, text in (("dry_run", "Print the commands; run nothing."),
                       ("only_prepare", "Only make the protected sets."),
                       ("report_only", "Rebuild results.csv, table.md and plots from finished runs."),
                       ("agent_run", "Run the one trial a W&B agent hands out (the sweep's command).")):
        group.add_argument(f"--{flag}", action=ActionYesNo, nargs="?", default=False, help=text)
    group.add_argument("--max_runs", type=int | None, default=None, help="Run at most N pending victims.")
    group.add_argument("--new_data_dir", action=ActionYesNo, nargs="?", default=False,
                       help="Run again the finished runs made with another data dir (refused by default: "
                       "the run key covers the data path, so a moved dataset would repeat every run).")
    group.add_argument("--runs_per_gpu", type=PositiveInt, default=1,
                       help="Victims sharing each GPU at once (local backend): small victims leave a large "
                       "GPU idle while their loaders decode images.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`fuse sweep FILE [options]`; returns the exit status.

    Ctrl-C or SIGTERM stops the running victims and prepare commands (their whole process
    groups) and returns 128 + the signal number; finished runs stay, rerunning resumes.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--config", *argv]  # FILE first, like `fuse sweep configs/sweeps/demo.yaml`
    parser = build_parser(exit_on_error=False)
    try:
        cfg = parser.parse_args(argv)  # --help and --print_config exit here
        with stop_children_on_exit():
            return _run(parser, cfg)
    except KeyboardInterrupt as exc:
        name = signal.Signals(getattr(exc, "signum", signal.SIGINT)).name
        print(f"fuse sweep: stopped by {name}; running children were stopped, finished runs are kept; "
              "rerun the same command to resume", file=sys.stderr)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))
    except (SweepError, ArgumentError) as exc:
        where = f"{argv[1]}: " if isinstance(exc, ArgumentError) and argv[:1] == ["--config"] else ""
        print(f"fuse sweep: error: {where}{exc}", file=sys.stderr)
        return 2


sweep_main = main


def _run(parser: ArgumentParser, cfg: Namespace) -> int:
    path = Path(str(cfg.config[-1])) if cfg.get("config") else Path("<command line>")
    sweep = resolve(spec_from(parser, cfg), path)
    backend = None
    if cfg.backend == "wandb":
        from fuse_lightning.sweep import wandb_backend as backend
    if cfg.report_only and backend:
        return backend.report(sweep, cfg.data_dir)
    if cfg.report_only:
        write_sweep_report(_whole_grid(sweep), data_dir=cfg.data_dir)
        return 0
    data_dir = cfg.data_dir or os.environ.get("FUSE_DATA_DIR", "data")
    if missing := missing_files(sweep):
        raise SweepError(f"{sweep.path}: config file(s) not found: {missing}")
    if backend:
        return backend.run(sweep, data_dir, cfg.dry_run, cfg.max_runs, cfg.agent_run, new_data_dir=cfg.new_data_dir)
    return run_local(sweep, data_dir, cfg.dry_run, cfg.only_prepare, cfg.max_runs, report=_whole_grid(sweep),
                     runs_per_gpu=cfg.runs_per_gpu, new_data_dir=cfg.new_data_dir)


def _whole_grid(sweep: Sweep) -> Sweep:
    """The sweep over its file's whole grid plus any points the command line added, so that a
    pass narrowed with --grid.method/--grid.seed/... never shrinks the committed report."""
    try:
        file_grid = load_sweep(sweep.path).grid if sweep.path.is_file() else sweep.grid
    except SweepError:  # the file is valid only with the command line's overrides
        file_grid = sweep.grid
    return with_grid(sweep, union_grid(file_grid, sweep.grid))
