"""Evaluation sweeps: protect a training set with every method, train victims on it, tabulate.

A sweep file (`configs/sweeps/*.yaml`, format in docs/evaluation.md) names the methods, how each
one produces its protected training set (`prepare` commands, run once), and a grid over
method x victim architecture x attacker filter x seed. Every grid point is one victim run
(`python -m fuse_lightning fit ...`) in its own directory; its final clean test accuracy goes to
`result.json`, keyed by a hash of its command (`run_key`). A run whose `result.json` holds the
key of the command the sweep would run now is skipped, so a killed sweep resumes where it
stopped, while a run whose settings changed since (victim args, configs, the method's prepare
commands) runs again; the report leaves such stale results out. Prepared methods are keyed the
same way (`<method_dir>/prepare.json`). At the end the results become `results.csv`, `table.md` and plots (`results.py`).

    fuse sweep configs/sweeps/cifar10_cpu.yaml --data-dir ../shared/data [--dry-run]

Backends: `local` runs one victim at a time on CPU, or one per visible GPU in parallel;
`wandb` registers a W&B sweep and serves it with an agent (more machines can join).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import itertools
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fuse_lightning import results as R

__all__ = [
    "Method",
    "Run",
    "Sweep",
    "SweepError",
    "SweepInterrupted",
    "execute",
    "expand_grid",
    "expand_command",
    "load_sweep",
    "method_is_current",
    "parse_metrics",
    "portable_command",
    "prepare_key",
    "prepare_methods",
    "read_result",
    "result_is_current",
    "run_key",
    "run_local",
    "run_victims",
    "split_results",
    "stop_children",
    "stop_children_on_exit",
    "sweep_main",
    "victim_command",
    "write_sweep_report",
]

SWEEP_KEYS = {
    "name",
    "description",
    "results_dir",
    "work_dir",
    "victim_configs",
    "victim_args",
    "methods",
    "grid",
    "keep_checkpoints",
    "filter_test_set",
    "wandb",
}
METHOD_KEYS = {"prepare", "protected_dir", "from_sweep", "description"}
GRID_KEYS = ("method", "arch", "filter", "seed")
PLACEHOLDERS = ("data_dir", "protected_dir", "method_dir", "work_dir")
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
# First words of a command that mean "this package's CLI" (run with the current interpreter).
_OWN_CLI = ("lightning", "fuse")

Executor = Callable[[list[str], Path, dict[str, str] | None], int]


class SweepError(ValueError):
    """A sweep file is invalid, or a sweep cannot run (message names the file and key)."""


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was told to stop (SIGTERM, or a child killed while stopping); nothing is recorded.

    Args:
        signum: The signal that stopped the sweep.
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@dataclass(frozen=True)
class Method:
    """How one method's training set is obtained.

    Attributes:
        name: Method name used in the grid.
        prepare: Commands (argument lists, with placeholders) that create `protected_dir`.
        protected_dir: Protected training set; None trains on the clean set.
        method_dir: Scratch directory of the prepare commands (`{method_dir}`).
        description: Free text for humans.
    """

    name: str
    prepare: tuple[tuple[str, ...], ...] = ()
    protected_dir: Path | None = None
    method_dir: Path | None = None
    description: str = ""

    @property
    def is_prepared(self) -> bool:
        """True when the training set exists (always for the clean set); see also `method_is_current`."""
        return self.protected_dir is None or (self.protected_dir / "manifest.json").is_file()

    @property
    def record_path(self) -> Path | None:
        """`<method_dir>/prepare.json`: key of the prepare commands that made `protected_dir`."""
        return self.method_dir / "prepare.json" if self.method_dir is not None and self.prepare else None


@dataclass
class Sweep:
    """A parsed sweep file (paths relative to the working directory, like every config path)."""

    name: str
    path: Path
    results_dir: Path
    work_dir: Path
    victim_configs: list[str]
    victim_args: list[str]
    methods: dict[str, Method]
    grid: dict[str, list[Any]]
    keep_checkpoints: bool = False
    # Also apply each run's filter to the test set (band maps: train and test on the same band).
    filter_test_set: bool = False
    description: str = ""
    wandb: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One victim training: a grid point and where its outputs go."""

    method: str
    arch: str
    filter: str
    seed: int
    run_id: str
    run_dir: Path
    result_path: Path


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _fail(path: Path, key: str, message: str) -> SweepError:
    return SweepError(f"{path}: {key}: {message}")


def _str_list(value: Any, path: Path, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise _fail(path, key, f"expected a list of strings, got {value!r}")
    return [str(v) for v in value]


def _check_placeholders(words: Sequence[str], path: Path, key: str) -> None:
    for word in words:
        for name in _PLACEHOLDER.findall(word):
            if name not in PLACEHOLDERS:
                raise _fail(
                    path, key, f"unknown placeholder {{{name}}} in {word!r}; known: "
                    + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                )


def expand_command(words: Sequence[str], values: dict[str, str | os.PathLike | None]) -> list[str]:
    """Substitute `{data_dir}`-style placeholders and map the project's CLI to this interpreter.

    Args:
        words: Command as an argument list, e.g. `["fuse", "protect", "--out", "{protected_dir}"]`.
        values: Placeholder values; only the names in `PLACEHOLDERS` are replaced, other braces
            (e.g. inline JSON) are left alone.

    Returns:
        The argument list. A first word `lightning` or `fuse` becomes
        `[sys.executable, "-m", "fuse_lightning"]` and `python` becomes `sys.executable`, so no
        PATH or activated environment is needed.
    """

    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name not in PLACEHOLDERS or values.get(name) is None:
            return match.group(0)
        return str(values[name])

    out = [_PLACEHOLDER.sub(substitute, str(w)) for w in words]
    if out and out[0] in _OWN_CLI:
        return [sys.executable, "-m", "fuse_lightning", *out[1:]]
    if out and out[0] in ("python", "python3"):
        return [sys.executable, *out[1:]]
    return out


def _parse_method(
    name: str, spec: Any, path: Path, work_dir: Path, stack: tuple[Path, ...]
) -> Method:
    key = f"methods.{name}"
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise _fail(path, key, f"expected a mapping (or {{}} for the clean set), got {spec!r}")
    unknown = set(spec) - METHOD_KEYS
    if unknown:
        raise _fail(path, key, f"unknown keys {sorted(unknown)}; allowed: {sorted(METHOD_KEYS)}")
    if "from_sweep" in spec:
        if set(spec) - {"from_sweep", "description"}:
            raise _fail(path, key, "from_sweep cannot be combined with prepare / protected_dir")
        other_path = Path(str(spec["from_sweep"]))
        if other_path.resolve() in stack:
            raise _fail(path, key, f"from_sweep {other_path} refers back to itself")
        other = _load(other_path, stack)
        if name not in other.methods:
            raise _fail(path, key, f"{other_path} defines no method {name!r}")
        return other.methods[name]
    prepare = spec.get("prepare") or []
    if not isinstance(prepare, list) or not all(isinstance(c, list) and c for c in prepare):
        raise _fail(path, f"{key}.prepare", "expected a list of commands, each a non-empty list")
    commands = tuple(tuple(_str_list(c, path, f"{key}.prepare")) for c in prepare)
    for c in commands:
        _check_placeholders(c, path, f"{key}.prepare")
    method_dir = work_dir / "methods" / name
    if spec.get("protected_dir") is not None:
        protected = str(spec["protected_dir"])
        _check_placeholders([protected], path, f"{key}.protected_dir")
        if "{data_dir}" in protected or "{protected_dir}" in protected:
            raise _fail(path, f"{key}.protected_dir", "may only use {work_dir} and {method_dir}")
        protected_dir: Path | None = Path(
            protected.replace("{work_dir}", str(work_dir)).replace("{method_dir}", str(method_dir))
        )
    elif commands:
        protected_dir = work_dir / "protected" / name
    else:
        protected_dir = None  # neither prepare nor protected_dir: the clean training set
    return Method(name, commands, protected_dir, method_dir, str(spec.get("description", "")))


def _validate_grid_values(name: str, values: list[Any], sweep: Sweep) -> None:
    path = sweep.path
    if name == "method":
        missing = [m for m in values if m not in sweep.methods]
        if missing:
            raise _fail(path, "grid.method", f"{missing} not defined under methods ({sorted(sweep.methods)})")
    elif name == "seed":
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in values):
            raise _fail(path, "grid.seed", f"seeds must be integers, got {values!r}")
    elif name == "filter":
        try:
            from fuse_lightning.filters import filter_from_name
        except ImportError:  # pragma: no cover - filters are part of the package
            return
        for f in values:
            try:
                built = filter_from_name(str(f))
            except ValueError as exc:
                raise _fail(path, "grid.filter", str(exc)) from None
            if built.name != f:
                # Run ids and tables use the name; it must be the canonical spelling.
                raise _fail(path, "grid.filter", f"{f!r} should be written {built.name!r}")
    elif name == "arch":
        try:
            from fuse_lightning.nets import available_classifiers
        except ImportError:  # pragma: no cover
            return
        unknown = [a for a in values if a not in available_classifiers()]
        if unknown:
            raise _fail(path, "grid.arch", f"unknown {unknown}; available: {available_classifiers()}")


def _load(
    path: Path,
    stack: tuple[Path, ...] = (),
    work_dir: str | os.PathLike | None = None,
    results_dir: str | os.PathLike | None = None,
) -> Sweep:
    if not path.is_file():
        raise SweepError(f"{path}: sweep file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping at the top level")
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(SWEEP_KEYS)}")
    for key in ("name", "results_dir", "work_dir", "methods", "grid"):
        if key not in raw:
            raise _fail(path, key, "missing (required)")
    name = str(raw["name"])
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise _fail(path, "name", f"use letters, digits, '_', '-', '.' only, got {name!r}")
    work_dir = Path(str(work_dir if work_dir is not None else raw["work_dir"]))
    if not isinstance(raw["methods"], dict) or not raw["methods"]:
        raise _fail(path, "methods", "expected a non-empty mapping name -> spec")
    stack = (*stack, path.resolve())
    methods = {
        str(m): _parse_method(str(m), spec, path, work_dir, stack) for m, spec in raw["methods"].items()
    }
    for m in methods:
        if "__" in m:
            raise _fail(path, f"methods.{m}", "'__' separates run id parts; rename the method")
    victim_args = _str_list(raw.get("victim_args"), path, "victim_args")
    _check_placeholders(victim_args, path, "victim_args")
    wandb_cfg = raw.get("wandb") or {}
    if not isinstance(wandb_cfg, dict) or set(wandb_cfg) - {"project", "entity"}:
        raise _fail(path, "wandb", "expected a mapping with keys project, entity")
    sweep = Sweep(
        name=name,
        path=path,
        results_dir=Path(str(results_dir if results_dir is not None else raw["results_dir"])),
        work_dir=work_dir,
        victim_configs=_str_list(raw.get("victim_configs"), path, "victim_configs"),
        victim_args=victim_args,
        methods=methods,
        grid={},
        keep_checkpoints=bool(raw.get("keep_checkpoints", False)),
        filter_test_set=bool(raw.get("filter_test_set", False)),
        description=str(raw.get("description", "") or ""),
        wandb=dict(wandb_cfg),
    )
    grid = raw["grid"]
    if not isinstance(grid, dict):
        raise _fail(path, "grid", "expected a mapping with keys method, arch, filter, seed")
    unknown = set(grid) - set(GRID_KEYS)
    if unknown:
        raise _fail(path, "grid", f"unknown keys {sorted(unknown)}; allowed: {list(GRID_KEYS)}")
    defaults = {"filter": ["none"], "seed": [0]}
    for key in GRID_KEYS:
        values = grid.get(key, defaults.get(key))
        if values is None:
            raise _fail(path, f"grid.{key}", "missing (required)")
        if not isinstance(values, list) or not values:
            raise _fail(path, f"grid.{key}", f"expected a non-empty list, got {values!r}")
        if len(set(map(str, values))) != len(values):
            raise _fail(path, f"grid.{key}", f"duplicate values in {values!r}")
        values = values if key == "seed" else [str(v) for v in values]
        _validate_grid_values(key, values, sweep)
        sweep.grid[key] = values
    return sweep


def load_sweep(
    path: str | os.PathLike,
    work_dir: str | os.PathLike | None = None,
    results_dir: str | os.PathLike | None = None,
) -> Sweep:
    """Read and validate a sweep file.

    Args:
        path: YAML sweep file.
        work_dir: Use this work directory instead of the file's `work_dir` (protected sets and
            runs of its methods move with it, except methods taken `from_sweep`).
        results_dir: Use this results directory instead of the file's `results_dir`.

    Returns:
        The parsed `Sweep`.

    Raises:
        SweepError: Unknown or missing keys, a grid method that is not defined, a filter name
            that `fuse_lightning.filters.filter_from_name` rejects, an unknown architecture...
            The message names the file and the key.
    """
    return _load(Path(path), (), work_dir, results_dir)


def missing_files(sweep: Sweep) -> list[str]:
    """Victim config files the sweep names that do not exist (checked before running)."""
    return [c for c in sweep.victim_configs if not Path(c).is_file()]


# --------------------------------------------------------------------------------------------
# Grid and commands
# --------------------------------------------------------------------------------------------


def expand_grid(sweep: Sweep) -> list[Run]:
    """All grid points, method-major (then arch, filter, seed) in the order of the sweep file.

    Args:
        sweep: A loaded sweep.

    Returns:
        One `Run` per grid point, with id `<method>__<arch>__<filter>__s<seed>`.
    """
    runs = []
    g = sweep.grid
    for method, arch, filt, seed in itertools.product(g["method"], g["arch"], g["filter"], g["seed"]):
        run_id = f"{method}__{arch}__{filt}__s{seed}"
        run_dir = sweep.work_dir / "runs" / run_id
        runs.append(Run(method, arch, filt, int(seed), run_id, run_dir, run_dir / "result.json"))
    return runs


def _placeholder_values(sweep: Sweep, method: Method, data_dir: str | os.PathLike) -> dict[str, Any]:
    return {
        "data_dir": data_dir,
        "protected_dir": method.protected_dir,
        "method_dir": method.method_dir,
        "work_dir": sweep.work_dir,
    }


def victim_command(sweep: Sweep, run: Run, data_dir: str | os.PathLike) -> list[str]:
    """The `fit` command of one victim run (logs, metrics and checkpoints land in `run.run_dir`).

    Args:
        sweep: The sweep.
        run: The grid point.
        data_dir: Dataset root (the clean test set always comes from here).

    Returns:
        Argument list starting with `sys.executable -m fuse_lightning fit`.
    """
    method = sweep.methods[run.method]
    values = _placeholder_values(sweep, method, data_dir)
    cmd = ["lightning", "fit"]
    for config in sweep.victim_configs:
        cmd += ["--config", config]
    cmd += list(sweep.victim_args)
    cmd += ["--data.init_args.data_dir", str(data_dir)]
    if method.protected_dir is not None:
        cmd += ["--data.init_args.protected_dir", str(method.protected_dir)]
    if run.filter != "none":
        cmd += ["--data.init_args.train_filter", run.filter]
        if sweep.filter_test_set:
            cmd += ["--data.init_args.test_filter", run.filter]
    cmd += [
        "--model.init_args.arch", run.arch,
        "--seed_everything", str(run.seed),
        # CSVLogger with empty name and version: metrics.csv, hparams.yaml and (through the
        # logger's directory) checkpoints/ go straight into the run directory.
        "--trainer.logger.init_args.save_dir", str(run.run_dir),
        "--trainer.logger.init_args.name", "",
        "--trainer.logger.init_args.version", "",
        "--trainer.default_root_dir", str(run.run_dir),
    ]
    return expand_command(cmd, values)


# --------------------------------------------------------------------------------------------
# Keys: which finished runs and prepared sets still belong to the sweep's current settings
# --------------------------------------------------------------------------------------------


def portable_command(cmd: Sequence[str]) -> list[str]:
    """The command with this machine's interpreter path written as `python`.

    Args:
        cmd: An argument list from `expand_command` or `victim_command`.

    Returns:
        The same words, except a first word equal to `sys.executable`, so that a key does not
        change when the same settings run from another environment.
    """
    words = [str(w) for w in cmd]
    if words and words[0] == sys.executable:
        words[0] = "python"
    return words


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def prepare_key(sweep: Sweep, method: Method, data_dir: str | os.PathLike) -> str | None:
    """Hash of a method's prepare commands as they would run now (None without commands).

    Args:
        sweep: The sweep.
        method: The method.
        data_dir: Dataset root (part of the commands).

    Returns:
        sha256 hex digest of the expanded commands (see `portable_command`), or None.
    """
    if not method.prepare:
        return None
    values = _placeholder_values(sweep, method, data_dir)
    return _digest([portable_command(expand_command(words, values)) for words in method.prepare])


def run_key(sweep: Sweep, run: Run, data_dir: str | os.PathLike) -> str:
    """Hash of everything a victim run's result depends on that the sweep controls.

    Args:
        sweep: The sweep.
        run: The grid point.
        data_dir: Dataset root.

    Returns:
        sha256 hex digest of the victim command (`portable_command`) and of its method's
        `prepare_key` (a method prepared by other commands makes other training data).
    """
    command = portable_command(victim_command(sweep, run, data_dir))
    return _digest({"command": command, "prepare": prepare_key(sweep, sweep.methods[run.method], data_dir)})


def read_result(run: Run) -> dict[str, Any] | None:
    """The run's `result.json` as a dict, or None when it is missing or unreadable."""
    try:
        row = json.loads(run.result_path.read_text())
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) else None


def result_is_current(sweep: Sweep, run: Run, data_dir: str | os.PathLike | None) -> bool:
    """Whether the run has a result made by the command the sweep would run for it now.

    Args:
        sweep: The sweep.
        run: The grid point.
        data_dir: Dataset root; None compares with the data directory the result was made with
            (reports built without `--data-dir`).

    Returns:
        False for a missing result, a result without `run_key` (written before keys were
        recorded) and a result whose key differs from `run_key` (stale).
    """
    row = read_result(run)
    if row is None:
        return False
    if data_dir is None:
        data_dir = row.get("data_dir")
        if data_dir is None:
            return False
    return row.get("run_key") == run_key(sweep, run, data_dir)


def method_is_current(sweep: Sweep, method: Method, data_dir: str | os.PathLike) -> bool:
    """Whether a method's training set exists and was made by its current prepare commands.

    Args:
        sweep: The sweep.
        method: The method.
        data_dir: Dataset root.

    Returns:
        True for the clean set and for a given `protected_dir` without prepare commands that
        has its manifest; for prepared methods, also `<method_dir>/prepare.json` must hold the
        current `prepare_key`.
    """
    if not method.is_prepared:
        return False
    if method.record_path is None:
        return True
    try:
        record = json.loads(method.record_path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("key") == prepare_key(sweep, method, data_dir)


# --------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------


# Children of `execute` that are still running, and whether the sweep is stopping.
_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()
_STOPPING = threading.Event()


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the child's process group, wait up to `grace_s`, then SIGKILL it and wait."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already
        try:
            proc.wait(timeout=wait_s)
            if sig == signal.SIGTERM:
                # The leader is gone; kill what is left of its group (e.g. dataloader workers).
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_children(grace_s: float = 10.0) -> int:
    """Stop every running child of `execute` and refuse new ones until `execute` is re-armed.

    Args:
        grace_s: Seconds each child's process group gets after SIGTERM before SIGKILL.

    Returns:
        The number of children that were running.
    """
    _STOPPING.set()
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for proc in children:
        _kill_group(proc, grace_s)
    return len(children)


def execute(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Run a command with stdout and stderr appended to `log_path`; return its exit code.

    The child runs in its own process group (session). If this call is interrupted
    (KeyboardInterrupt, `SweepInterrupted` from SIGTERM) the group is terminated and waited for
    before the exception propagates; a child stopped by `stop_children` (another thread was
    interrupted) raises `SweepInterrupted` instead of returning an exit code, so nothing is
    recorded for it.

    Args:
        cmd: Argument list.
        log_path: Output file (appended).
        env: Extra environment variables.

    Returns:
        The child's exit code.

    Raises:
        SweepInterrupted: The sweep is stopping.
    """
    if _STOPPING.is_set():
        raise SweepInterrupted()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        with _CHILDREN_LOCK:
            _CHILDREN.add(proc)
        try:
            code = proc.wait()
        except BaseException:
            _kill_group(proc, 10.0)
            raise
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)
    if _STOPPING.is_set():
        raise SweepInterrupted()
    return code


@contextlib.contextmanager
def stop_children_on_exit(grace_s: float = 10.0):
    """Run the body with SIGTERM raising `SweepInterrupted` and every child stopped on the way out.

    Inside, `execute` may start children (the stop flag is cleared on entry and on exit). When
    the body raises (Ctrl-C, SIGTERM, an error), the running children's process groups are
    terminated and waited for before the exception propagates. The body must have waited for
    its worker threads before it ends. SIGTERM is only handled in the main thread.

    Args:
        grace_s: Seconds between SIGTERM and SIGKILL for each child.
    """

    def on_term(signum, frame):
        raise SweepInterrupted(signum)

    _STOPPING.clear()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except BaseException:
        stop_children(grace_s)
        raise
    finally:
        _STOPPING.clear()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def log_tail(path: Path, lines: int = 30) -> str:
    """Last `lines` lines of a text file ('' when it does not exist)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def parse_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """Accuracies from a Lightning CSVLogger `metrics.csv`.

    Args:
        path: The metrics file.

    Returns:
        `val_acc` (last logged `val/acc`: the final epoch, the number the protocol reports),
        `best_val_acc` (maximum over epochs), `train_acc` (last `train/acc`, None if never
        logged) and `epochs` (number of validation rows).

    Raises:
        ValueError: No `val/acc` value in the file.
    """
    val: list[float] = []
    train: list[float] = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("val/acc") not in (None, ""):
                val.append(float(row["val/acc"]))
            if row.get("train/acc") not in (None, ""):
                train.append(float(row["train/acc"]))
    if not val:
        raise ValueError(f"{path}: no val/acc values logged")
    return {
        "val_acc": val[-1],
        "best_val_acc": max(val),
        "train_acc": train[-1] if train else None,
        "epochs": len(val),
    }


def _num_classes(run_dir: Path) -> int | None:
    # The logger's hparams.yaml holds the model hyper-parameters after the data -> model links.
    hparams = run_dir / "hparams.yaml"
    try:
        value = (yaml.safe_load(hparams.read_text()) or {}).get("num_classes")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


def _remove_checkpoints(run_dir: Path) -> None:
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        ckpt.unlink()


def execute_run(
    sweep: Sweep,
    run: Run,
    data_dir: str | os.PathLike,
    env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
    executor: Executor = execute,
) -> dict[str, Any]:
    """Train one victim and write its `result.json` (atomically).

    Args:
        sweep: The sweep.
        run: The grid point.
        data_dir: Dataset root.
        env: Extra environment variables (e.g. `CUDA_VISIBLE_DEVICES`).
        extra_args: Appended to the victim command (e.g. `--trainer.accelerator gpu`).
        executor: Runs the command; replaceable in tests.

    Returns:
        The result row (with `run_key` and `data_dir`, see `result_is_current`); on failure
        `{"run_id", "error", "log"}` and a `failed.json` in the run directory (removed by the
        next successful attempt). A stale `result.json` is removed before the command starts.
    """
    cmd = victim_command(sweep, run, data_dir) + list(extra_args)
    key = run_key(sweep, run, data_dir)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if run.result_path.exists():
        # A result of other settings (stale): it and its checkpoints do not belong to this run.
        run.result_path.unlink()
        _remove_checkpoints(run.run_dir)
    metrics = run.run_dir / "metrics.csv"
    if metrics.exists():
        metrics.unlink()  # a stale file from a killed attempt must not be read as this run's
    log_path = run.run_dir / "run.log"
    start = time.perf_counter()
    code = executor(cmd, log_path, env)
    wall = time.perf_counter() - start
    error = None
    if code != 0:
        error = f"exit code {code}"
    else:
        try:
            parsed = parse_metrics(metrics)
        except (OSError, ValueError) as exc:
            error = str(exc)
    if error is not None:
        failure = {"run_id": run.run_id, "error": error, "log": str(log_path), "tail": log_tail(log_path)}
        R.atomic_write_text(run.run_dir / "failed.json", json.dumps(failure, indent=2))
        return failure
    method = sweep.methods[run.method]
    row = {
        "run_id": run.run_id,
        "method": run.method,
        "arch": run.arch,
        "filter": run.filter,
        "seed": run.seed,
        **parsed,
        "num_classes": _num_classes(run.run_dir),
        "wall_s": round(wall, 1),
        "protected_dir": str(method.protected_dir) if method.protected_dir else None,
        "data_dir": str(data_dir),
        "run_key": key,
        "command": shlex.join(portable_command(cmd)),
    }
    R.atomic_write_text(run.result_path, json.dumps(row, indent=2))
    (run.run_dir / "failed.json").unlink(missing_ok=True)
    if not sweep.keep_checkpoints:
        _remove_checkpoints(run.run_dir)
    return row


def prepare_methods(
    sweep: Sweep,
    method_names: Sequence[str],
    data_dir: str | os.PathLike,
    executor: Executor = execute,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Create the protected training sets that are missing or stale, one method after another.

    A method is skipped when `method_is_current` (its manifest exists and `<method_dir>/
    prepare.json` holds the key of the current commands). Otherwise an existing protected set
    is moved aside to `<protected_dir>.stale` (replacing an older one) and the commands run in
    order with output in `<method_dir>/prepare.log`; the first failing command stops that
    method. After success the commands' key is written to `prepare.json`.

    Args:
        sweep: The sweep.
        method_names: Methods to prepare (those of the grid).
        data_dir: Dataset root.
        executor: Runs a command; replaceable in tests.
        dry_run: Only print the commands.
        log: Progress output.

    Returns:
        Names of the methods whose preparation failed (their runs are then skipped).
    """
    failed = []
    for name in method_names:
        method = sweep.methods[name]
        if method_is_current(sweep, method, data_dir):
            continue
        if not method.prepare:
            log(f"[prepare] {name}: {method.protected_dir} has no manifest.json and the method has no prepare commands")
            failed.append(name)
            continue
        values = _placeholder_values(sweep, method, data_dir)
        log_path = Path(method.method_dir) / "prepare.log"
        if not dry_run:
            _set_aside(method, log)
        for words in method.prepare:
            cmd = expand_command(words, values)
            if dry_run:
                print(shlex.join(cmd))
                continue
            log(f"[prepare] {name}: {shlex.join(words)}")
            start = time.perf_counter()
            code = executor(cmd, log_path, None)
            if code != 0:
                log(f"[prepare] {name}: FAILED (exit {code}) after {time.perf_counter() - start:.0f}s; "
                    f"log {log_path}:\n{log_tail(log_path, 20)}")
                failed.append(name)
                break
            log(f"[prepare] {name}: done in {time.perf_counter() - start:.0f}s")
        else:
            if not dry_run and not method.is_prepared:
                log(f"[prepare] {name}: commands succeeded but {method.protected_dir}/manifest.json is missing")
                failed.append(name)
            elif not dry_run:
                commands = [portable_command(expand_command(w, values)) for w in method.prepare]
                record = {"key": prepare_key(sweep, method, data_dir), "commands": commands}
                R.atomic_write_text(method.record_path, json.dumps(record, indent=2))
    return failed


def _set_aside(method: Method, log: Callable[[str], None]) -> None:
    """Before preparing: forget the old key, move an old protected set to `<protected_dir>.stale`."""
    if method.record_path is not None:
        method.record_path.unlink(missing_ok=True)
    old = method.protected_dir
    if old is None or not old.exists():
        return
    aside = old.with_name(old.name + ".stale")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(old, aside)
    log(f"[prepare] {method.name}: {old} was made by other prepare commands (or before they were "
        f"recorded); moved to {aside}, preparing again")


def visible_gpus() -> list[str]:
    """Physical GPU ids this process may use (honours an existing CUDA_VISIBLE_DEVICES)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / broken driver: run on CPU
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


@dataclass
class RunSummary:
    """Outcome of `run_victims`."""

    finished: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    stale: int = 0


def run_victims(
    sweep: Sweep,
    runs: Sequence[Run],
    data_dir: str | os.PathLike,
    gpus: Sequence[str] = (),
    max_runs: int | None = None,
    executor: Executor = execute,
    log: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run the victims without a current result (missing, or stale: see `result_is_current`).

    Without GPUs the runs go one after another; with N GPUs, N at a time, each pinned to one
    device via `CUDA_VISIBLE_DEVICES` and `--trainer.accelerator gpu --trainer.devices 1`.

    Args:
        sweep: The sweep.
        runs: Grid points (from `expand_grid`).
        data_dir: Dataset root.
        gpus: Physical GPU ids to use; empty means CPU.
        max_runs: Run at most this many of the pending runs.
        executor: Runs a command; replaceable in tests.
        log: Progress output (defaults to the progress bar's `write`).

    Returns:
        Finished rows, failures, the number of runs skipped because they were done and the
        number of pending runs that had a stale result.
    """
    from tqdm.auto import tqdm

    summary = RunSummary()
    pending = [r for r in runs if not result_is_current(sweep, r, data_dir)]
    summary.skipped = len(runs) - len(pending)
    summary.stale = sum(r.result_path.is_file() for r in pending)
    if max_runs is not None:
        pending = pending[:max_runs]
    if not pending:
        return summary
    bar = tqdm(total=len(pending), desc=sweep.name, unit="run", dynamic_ncols=True)
    out = log or bar.write
    lock = threading.Lock()
    devices: queue.Queue[str | None] = queue.Queue()
    for d in gpus or [None]:
        devices.put(d)
    counter = itertools.count(1)

    def work(run: Run) -> None:
        device = devices.get()
        try:
            env = {"CUDA_VISIBLE_DEVICES": device} if device is not None else None
            extra = ["--trainer.accelerator", "gpu", "--trainer.devices", "1"] if device is not None else []
            start = time.perf_counter()
            row = execute_run(sweep, run, data_dir, env, extra, executor)
            took = time.perf_counter() - start
        finally:
            devices.put(device)
        with lock:
            i = next(counter)
            where = f" gpu{device}" if device is not None else ""
            if "error" in row:
                summary.failed.append(row)
                out(f"[{i}/{len(pending)}] {run.run_id}{where}  FAILED ({row['error']}) {took:.0f}s  log: {row['log']}")
            else:
                summary.finished.append(row)
                out(f"[{i}/{len(pending)}] {run.run_id}{where}  val/acc {100 * row['val_acc']:.2f}%  {took:.0f}s")
            bar.update(1)

    pool = ThreadPoolExecutor(max_workers=max(1, len(gpus)))
    with stop_children_on_exit():
        try:
            for future in [pool.submit(work, r) for r in pending]:
                future.result()
        except BaseException:
            stop_children()  # before waiting for the workers: they wait for their children
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # queued runs are dropped
            bar.close()
    return summary


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def split_results(
    sweep: Sweep, data_dir: str | os.PathLike | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Current results of the sweep's grid points, in grid order, and the ids of stale ones.

    Args:
        sweep: The sweep.
        data_dir: Dataset root the runs should have used; None accepts the one each result
            records (see `result_is_current`).

    Returns:
        (rows of current results, run ids whose `result.json` exists but is stale).
    """
    rows, stale = [], []
    for run in expand_grid(sweep):
        if result_is_current(sweep, run, data_dir):
            rows.append(read_result(run))
        elif run.result_path.is_file():
            stale.append(run.run_id)
    return rows, stale


def sweep_rows(sweep: Sweep, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Current results of the sweep's grid points, in grid order (stale ones left out)."""
    return split_results(sweep, data_dir)[0]


def write_sweep_report(
    sweep: Sweep, log: Callable[[str], None] = print, data_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Write results.csv, table.md and plots of the current results into `sweep.results_dir`.

    Args:
        sweep: The sweep.
        log: Progress output.
        data_dir: Dataset root for `result_is_current` (None: each result's own).

    Returns:
        The written files by kind (see `results.write_report`).
    """
    rows, stale = split_results(sweep, data_dir)
    if stale:
        log(f"{sweep.name}: {len(stale)} stale result(s) left out of the report (settings changed "
            f"since they ran; rerun the sweep to replace them): {', '.join(stale[:5])}"
            + (" ..." if len(stale) > 5 else ""))
    seeds = sorted({r["seed"] for r in rows})
    notes = (sweep.description.strip() + "\n\n" if sweep.description else "") + (
        "Clean test accuracy (%) of victims trained on each method's training set after the "
        "attacker's filter (columns), at the final epoch; "
        + (f"mean ± std over seeds {seeds}." if len(seeds) > 1 else f"seed {seeds[0] if seeds else '-'}.")
        + f" {len(rows)} of {len(expand_grid(sweep))} runs finished"
        + (f" ({len(stale)} stale result(s) of older settings left out)" if stale else "")
        + f". Sweep file: `{sweep.path}`."
    )
    return R.write_report(
        rows, sweep.results_dir, f"{sweep.name}", notes,
        methods=sweep.grid["method"], filters=sweep.grid["filter"], log=log,
    )


# --------------------------------------------------------------------------------------------
# Weights & Biases backend
# --------------------------------------------------------------------------------------------


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise SweepError("--backend wandb needs the wandb package: pip install wandb") from None
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        raise SweepError(
            f"--backend wandb needs the W&B server, but WANDB_MODE={os.environ['WANDB_MODE']}; "
            "use --backend local (results stay in the work directory), or unset WANDB_MODE"
        )
    return wandb


def wandb_sweep_config(sweep: Sweep) -> dict[str, Any]:
    """W&B sweep definition: a grid over method/arch/filter/seed served by `fuse sweep --agent-run`.

    Agents started elsewhere with `wandb agent ENTITY/PROJECT/SWEEP_ID` run the command below in
    their own checkout (the data directory comes from their `FUSE_DATA_DIR`).
    """
    return {
        "name": sweep.name,
        "method": "grid",
        "metric": {"name": "val_acc", "goal": "minimize"},  # protection wants low accuracy
        "parameters": {k: {"values": list(sweep.grid[k])} for k in GRID_KEYS},
        "command": [
            "${env}", "${interpreter}", "-m", "fuse_lightning", "sweep", str(sweep.path),
            "--backend", "wandb", "--agent-run",
        ],
    }


def _wandb_run_one(sweep: Sweep, data_dir: str, wandb: Any) -> None:
    """Body of one W&B agent trial: read the grid point from `wandb.config`, run it, log it."""
    run_wandb = wandb.init(group=sweep.name, job_type="victim")
    cfg = run_wandb.config
    run = next(
        (r for r in expand_grid(sweep)
         if (r.method, r.arch, r.filter, r.seed) == (cfg["method"], cfg["arch"], cfg["filter"], int(cfg["seed"]))),
        None,
    )
    if run is None:
        run_wandb.finish(exit_code=1)
        raise SweepError(f"{sweep.path}: the W&B trial {dict(cfg)} is not a point of this grid")
    run_wandb.name = run.run_id
    if prepare_methods(sweep, [run.method], data_dir):
        run_wandb.finish(exit_code=1)
        return
    if result_is_current(sweep, run, data_dir):
        row = read_result(run)
    else:
        gpus = visible_gpus()[:1]
        extra = ["--trainer.accelerator", "gpu", "--trainer.devices", "1"] if gpus else []
        row = execute_run(sweep, run, data_dir, None, extra)
    if "error" in row:
        print(f"{run.run_id} failed: {row['error']}\n{row['tail']}", file=sys.stderr)
        run_wandb.finish(exit_code=1)
        return
    metrics = run.run_dir / "metrics.csv"
    if metrics.is_file():  # per-epoch history, so W&B charts show the training curve
        with open(metrics, newline="") as handle:
            for rec in csv.DictReader(handle):
                if rec.get("val/acc"):
                    wandb.log({"epoch": int(float(rec["epoch"])), "val/acc": float(rec["val/acc"])})
    run_wandb.summary.update({k: v for k, v in row.items() if k != "command"})
    run_wandb.finish()


def run_wandb_backend(sweep: Sweep, data_dir: str, max_runs: int | None, agent_run: bool) -> int:
    """Register the W&B sweep and serve it in-process, or (with `agent_run`) run one trial."""
    wandb = _import_wandb()
    if agent_run:
        _wandb_run_one(sweep, data_dir, wandb)
        return 0
    project = sweep.wandb.get("project") or os.environ.get("WANDB_PROJECT") or "fuse-lightning"
    entity = sweep.wandb.get("entity") or os.environ.get("WANDB_ENTITY")
    try:  # register first: a missing login or network fails before hours of preparation
        sweep_id = wandb.sweep(wandb_sweep_config(sweep), project=project, entity=entity)
    except Exception as exc:  # noqa: BLE001 - network / auth errors come in many types
        raise SweepError(f"could not register the W&B sweep ({type(exc).__name__}: {exc}); "
                         "check `wandb login` and the network, or use --backend local") from None
    where = "/".join(p for p in (entity, project, sweep_id) if p)
    print(f"W&B sweep {where}; more machines join with: wandb agent {where}")
    if prepare_methods(sweep, sweep.grid["method"], data_dir):
        return 1
    wandb.agent(sweep_id, function=lambda: _wandb_run_one(sweep, data_dir, wandb),
                project=project, entity=entity, count=max_runs)
    written = write_sweep_report(sweep, data_dir=data_dir)
    rows = sweep_rows(sweep, data_dir)
    summary = wandb.init(project=project, entity=entity, group=sweep.name, job_type="summary",
                         name=f"{sweep.name}-summary")
    columns = [c for c in R.RESULT_FIELDS if c != "command"]
    table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
    images = {k: wandb.Image(str(p)) for k, p in written.items() if p.suffix == ".png"}
    summary.log({"results": table, **images})
    summary.finish()
    return 0


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of `fuse sweep`."""
    parser = argparse.ArgumentParser(
        prog="fuse sweep",
        description="Run an evaluation sweep: prepare protected sets, train victims over the "
        "grid (resuming: finished runs are skipped), write results.csv, table.md and plots.",
    )
    parser.add_argument("sweep", help="sweep file, e.g. configs/sweeps/cifar10_cpu.yaml")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="dataset root (parent of cifar-10-batches-py); default $FUSE_DATA_DIR or 'data' "
        "(with --report-only: the one each result was made with)",
    )
    parser.add_argument("--backend", choices=("local", "wandb"), default="local",
                        help="local: here, one run per GPU (or one at a time on CPU); "
                        "wandb: a W&B sweep served by agents")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--only-prepare", action="store_true", help="only create the protected sets")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild results.csv, table.md and plots from finished runs")
    parser.add_argument("--max-runs", type=int, default=None, help="run at most N pending victims")
    parser.add_argument("--agent-run", action="store_true", help=argparse.SUPPRESS)
    return parser


def run_local(
    sweep: Sweep,
    data_dir: str | os.PathLike,
    dry_run: bool = False,
    only_prepare: bool = False,
    max_runs: int | None = None,
) -> int:
    """Run a sweep on this machine: prepare the methods, run the pending victims, report.

    Args:
        sweep: The sweep.
        data_dir: Dataset root.
        dry_run: Print the commands instead of running them.
        only_prepare: Stop after the protected sets exist.
        max_runs: Run at most this many pending victims.

    Returns:
        0 when everything succeeded, 1 when a prepare stage or a run failed.
    """
    runs = expand_grid(sweep)
    methods = list(sweep.grid["method"])
    if dry_run:
        print(f"# {sweep.name}: {len(runs)} runs; work dir {sweep.work_dir}")
        prepare_methods(sweep, methods, data_dir, dry_run=True)
        if not only_prepare:
            for run in runs:
                if result_is_current(sweep, run, data_dir):
                    status = "done "
                else:
                    status = "stale " if run.result_path.is_file() else ""
                print(f"# {status}{run.run_id}\n{shlex.join(victim_command(sweep, run, data_dir))}")
        return 0
    failed_methods = prepare_methods(sweep, methods, data_dir)
    if only_prepare:
        return 1 if failed_methods else 0
    runnable = [r for r in runs if r.method not in failed_methods]
    gpus = visible_gpus()
    done = sum(result_is_current(sweep, r, data_dir) for r in runs)
    print(f"{sweep.name}: {len(runs)} runs, {done} already done, on "
          + (f"{len(gpus)} GPU(s) {','.join(gpus)}" if gpus else "CPU"))
    summary = run_victims(sweep, runnable, data_dir, gpus, max_runs)
    write_sweep_report(sweep, data_dir=data_dir)
    table = (sweep.results_dir / "table.md")
    if table.is_file():
        print(table.read_text())
    problems = [f"prepare failed: {m} (log {sweep.methods[m].method_dir}/prepare.log)" for m in failed_methods]
    problems += [f"run failed: {f['run_id']} ({f['error']}; log {f['log']})" for f in summary.failed]
    blocked = len(runs) - len(runnable)
    print(f"{sweep.name}: {len(summary.finished)} finished ({summary.stale} of them replaced stale "
          f"results), {summary.skipped} skipped (done before), "
          f"{len(summary.failed)} failed, {blocked} blocked by a failed prepare")
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    return 1 if problems else 0


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fuse sweep` (see `build_parser`); returns the exit status.

    Ctrl-C or SIGTERM stops the running victims and prepare commands (their whole process
    groups) and returns 128 + the signal number; finished runs stay, rerunning resumes.
    """
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        with stop_children_on_exit():
            return _sweep_main(args)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"fuse sweep: stopped by {signal.Signals(signum).name}; running children were "
              "stopped, finished runs are kept; rerun the same command to resume", file=sys.stderr)
        return 128 + int(signum)


def _sweep_main(args: argparse.Namespace) -> int:
    try:
        sweep = load_sweep(args.sweep)
        if args.report_only:
            write_sweep_report(sweep, data_dir=args.data_dir)
            return 0
        data_dir = args.data_dir or os.environ.get("FUSE_DATA_DIR", "data")
        missing = missing_files(sweep)
        if missing:
            raise SweepError(f"{sweep.path}: victim_configs: file(s) not found: {missing}")
        if args.backend == "wandb":
            if args.dry_run:
                print(yaml.safe_dump(wandb_sweep_config(sweep), sort_keys=False))
                return 0
            return run_wandb_backend(sweep, data_dir, args.max_runs, args.agent_run)
        return run_local(sweep, data_dir, args.dry_run, args.only_prepare, args.max_runs)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(sweep_main())
