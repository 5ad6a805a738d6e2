"""Sweep files: typed specs (parsed by jsonargparse), validation, the grid, commands and keys.

Every command of a sweep is `python -m fuse_lightning <fit|baseline|protect>` with config files
and dotted overrides from the sweep file; the paths (data, run and method directories, where a
protected set goes) are added here. Keys (sha256 of a command with this machine's interpreter
written `python` and absolute paths made relative) tell whether a finished run or a prepared
set still belongs to the sweep's current settings.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from fuse_lightning import results as R

GRID_KEYS = ("method", "arch", "filter", "seed")
RESULT_WRITER = "fuse_lightning.callbacks.ResultWriter"


class SweepError(ValueError):
    """A sweep file is invalid, or a sweep cannot run (the message names the file and the key)."""


@dataclass
class VictimSpec:
    """The classifier every grid point trains from scratch (`python -m fuse_lightning fit`).

    Attributes:
        configs: Config files, composed in order (the last wins).
        overrides: Dotted overrides after the configs, e.g. `{trainer.max_epochs: 10}`.
        arch_overrides: Architecture -> dotted overrides after `overrides` for the grid points
            of that architecture, e.g. `{resnet18: {model.init_args.arch_kwargs: {width: 32}}}`.
    """

    configs: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    arch_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class MethodSpec:
    """How one method's training set is obtained; `{}` is the clean training set.

    Attributes:
        command: `fit` (runs in `<work_dir>/methods/<name>` as its `trainer.default_root_dir`;
            the config's ProtectOnFitEnd exports to `<that dir>/protected`), `baseline` or
            `protect` (`--out <work_dir>/methods/<name>/protected`). Runs once, before victims.
        configs: Config files of the command, composed in order.
        overrides: Dotted overrides of the command, e.g. `{model.init_args.rsm.enabled: false}`.
        protected_dir: An existing protected set (with manifest.json) made elsewhere.
        from_sweep: Another sweep file: use its method of the same name and that method's set.
        victim_overrides: Dotted overrides of this method's victims, last of all, e.g.
            `{data.init_args.exclude_subset: 5000}` to train them on images a generator trained
            on a 5000-image subset never saw.
        description: Free text.
    """

    command: Literal["fit", "baseline", "protect"] | None = None
    configs: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    protected_dir: str | None = None
    from_sweep: str | None = None
    victim_overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass
class GridSpec:
    """The grid: every combination is one victim run, method-major, in the order given.

    Attributes:
        method: Names defined under `methods`.
        arch: Victim architectures (`fuse_lightning.nets.available_classifiers()`).
        filter: Attacker filters (`fuse_lightning.filters.filter_from_name` names, written
            canonically); `none` trains on the set as it is.
        seed: Victim seeds (`seed_everything`).
    """

    method: list[str]
    arch: list[str]
    filter: list[str] = field(default_factory=lambda: ["none"])
    seed: list[int] = field(default_factory=lambda: [0])


@dataclass
class WandbSpec:
    """Where `--backend wandb` logs.

    Attributes:
        project: W&B project (default: $WANDB_PROJECT, else fuse-lightning).
        entity: W&B entity (default: $WANDB_ENTITY, else the account's default).
    """

    project: str | None = None
    entity: str | None = None


@dataclass
class SweepSpec:
    """An evaluation sweep: protect a training set with each method, train victims on it, tabulate.

    Attributes:
        name: Letters, digits, `_`, `-`, `.`; the table heading and the W&B group.
        results_dir: results.csv, table.md and plots go here (committed).
        work_dir: Protected sets (`methods/<name>/`) and victim runs (`runs/<run_id>/`).
        victim: The victim classifier.
        methods: Method name -> how its training set is made.
        grid: The grid of victim runs.
        description: Printed under the table heading.
        keep_checkpoints: Keep victim checkpoints after a run (default: deleted).
        filter_test_set: Also apply each run's filter to the test set (band maps).
        wandb: W&B project and entity of `--backend wandb`.
        compare: Method pairs `[a, b]` whose paired difference a − b (per filter, over victim
            seeds, with a 95 % CI) goes into table.md.
        pools: Name -> methods whose runs count as samples of one method, e.g. separately
            trained generators of one recipe (`fuse_all: [fuse, fuse_g1]`); usable in
            `compare_independent` only.
        compare_independent: Pairs `[a, b]` of methods or pools whose difference a − b, every run
            one sample (Welch's t, 95 % CI), goes into table.md: for protected sets that cannot
            be paired by victim seed.
    """

    name: str
    results_dir: str
    work_dir: str
    methods: dict[str, MethodSpec]
    grid: GridSpec
    victim: VictimSpec = field(default_factory=VictimSpec)
    description: str = ""
    keep_checkpoints: bool = False
    filter_test_set: bool = False
    wandb: WandbSpec = field(default_factory=WandbSpec)
    compare: list[list[str]] = field(default_factory=list)
    pools: dict[str, list[str]] = field(default_factory=dict)
    compare_independent: list[list[str]] = field(default_factory=list)


@dataclass(frozen=True)
class Method:
    """A method as the sweep runs it: its spec (from `from_sweep`'s file where used), the directory
    its command runs in (None without a command) and its training set (None: the clean set)."""

    name: str
    spec: MethodSpec
    method_dir: Path | None = None
    protected_dir: Path | None = None

    @property
    def is_prepared(self) -> bool:
        """True when the training set exists (always for the clean set)."""
        return self.protected_dir is None or (self.protected_dir / "manifest.json").is_file()

    @property
    def record_path(self) -> Path | None:
        """`<method_dir>/prepare.json`: the key of the command that made `protected_dir`."""
        return self.method_dir / "prepare.json" if self.method_dir is not None else None


@dataclass
class Sweep:
    """A loaded sweep: the typed spec, the file it came from, its resolved methods."""

    spec: SweepSpec
    path: Path
    methods: dict[str, Method]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def work_dir(self) -> Path:
        return Path(self.spec.work_dir)

    @property
    def results_dir(self) -> Path:
        return Path(self.spec.results_dir)

    @property
    def grid(self) -> GridSpec:
        return self.spec.grid


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


def union_grid(*grids: GridSpec) -> GridSpec:
    """Per axis, the values of the first grid, then the new values of the next ones, in order."""
    return GridSpec(**{k: list(dict.fromkeys(v for g in grids for v in getattr(g, k))) for k in GRID_KEYS})


def independent_comparisons(sweep: Sweep) -> list[tuple[str, list[str], str, list[str]]]:
    """`compare_independent` as `(label a, methods a, label b, methods b)`, pools expanded."""
    members = lambda name: list(sweep.spec.pools.get(name, [name]))  # noqa: E731
    return [(a, members(a), b, members(b)) for a, b in sweep.spec.compare_independent]


def with_grid(sweep: Sweep, grid: GridSpec) -> Sweep:
    """The same sweep over another grid (its methods must be defined in the sweep)."""
    return Sweep(replace(sweep.spec, grid=grid), sweep.path, sweep.methods)


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def spec_parser(**kwargs: Any) -> ArgumentParser:
    """A parser of the `SweepSpec` fields at the top level; a sweep file is its `--config`."""
    parser = ArgumentParser(**kwargs)
    parser.add_argument("--config", action=ActionConfigFile, help="Sweep file (given first: FILE).")
    parser.add_class_arguments(SweepSpec)
    return parser


def spec_from(parser: ArgumentParser, cfg: Namespace) -> SweepSpec:
    """The `SweepSpec` of a parsed namespace (other keys, e.g. command-line options, are ignored)."""
    init = parser.instantiate(cfg)
    return SweepSpec(**{f.name: init[f.name] for f in fields(SweepSpec)})


def load_sweep(path: str | os.PathLike, args: Sequence[str] = ()) -> Sweep:
    """Read and validate a sweep file, with dotted overrides of its fields (`["--work_dir", "x"]`).

    Raises:
        SweepError: A missing file, unknown keys or values of the wrong type, a grid method that
            is not defined, a non-canonical filter name, an unknown architecture...; the message
            names the file and the key.
    """
    return _load(Path(path), (), args)


def _load(path: Path, stack: tuple[Path, ...], args: Sequence[str] = ()) -> Sweep:
    if not path.is_file():
        raise SweepError(f"{path}: sweep file not found")
    parser = spec_parser(exit_on_error=False)
    try:
        cfg = parser.parse_args(["--config", str(path), *args])
    except Exception as exc:  # noqa: BLE001 - jsonargparse reports bad files in several types
        raise SweepError(f"{path}: {exc}") from None
    return resolve(spec_from(parser, cfg), path, stack)


def resolve(spec: SweepSpec, path: Path, stack: tuple[Path, ...] = ()) -> Sweep:
    """Validate a parsed spec and resolve its methods (directories, `from_sweep`)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", spec.name):
        raise SweepError(f"{path}: name: use letters, digits, '_', '-', '.' only, got {spec.name!r}")
    if not spec.methods:
        raise SweepError(f"{path}: methods: expected a non-empty mapping name -> method")
    stack = (*stack, path.resolve())
    methods = {name: _method(name, m, Path(spec.work_dir), path, stack) for name, m in spec.methods.items()}
    sweep = Sweep(spec, path, methods)
    for key in GRID_KEYS:
        _check_grid(sweep, key, getattr(spec.grid, key))
    from fuse_lightning.nets import available_classifiers

    if unknown := sorted(set(spec.victim.arch_overrides) - set(available_classifiers())):
        raise SweepError(f"{path}: victim.arch_overrides: unknown {unknown}; available: {available_classifiers()}")
    for pair in spec.compare:  # pairs outside a narrowed grid (--grid.method) simply have no rows
        if len(pair) != 2 or any(m not in spec.methods for m in pair):
            raise SweepError(f"{path}: compare: {pair!r} is not a pair of defined methods ({sorted(spec.methods)})")
    for pool, members in spec.pools.items():
        if pool in spec.methods or not members or any(m not in spec.methods for m in members):
            raise SweepError(f"{path}: pools.{pool}: a pool is a new name for a non-empty list of defined "
                             f"methods ({sorted(spec.methods)}), got {members!r}")
    for pair in spec.compare_independent:
        if len(pair) != 2 or any(m not in spec.methods and m not in spec.pools for m in pair):
            raise SweepError(f"{path}: compare_independent: {pair!r} is not a pair of defined methods or pools "
                             f"(methods {sorted(spec.methods)}, pools {sorted(spec.pools)})")
    return sweep


def _method(name: str, m: MethodSpec, work_dir: Path, path: Path, stack: tuple[Path, ...]) -> Method:
    where = f"{path}: methods.{name}"
    if "__" in name:
        raise SweepError(f"{where}: '__' separates the parts of run ids; rename the method")
    how = [k for k in ("command", "protected_dir", "from_sweep") if getattr(m, k) is not None]
    if len(how) > 1:
        raise SweepError(f"{where}: give one of command, protected_dir, from_sweep, not {how}")
    if m.command is None and (m.configs or m.overrides):
        raise SweepError(f"{where}: configs and overrides need a command (fit, baseline or protect)")
    if m.from_sweep is not None:
        other = Path(m.from_sweep)
        if other.resolve() in stack:
            raise SweepError(f"{where}: from_sweep {other} refers back to itself")
        methods = _load(other, stack).methods
        if name not in methods:
            raise SweepError(f"{where}: {other} defines no method {name!r}")
        return methods[name]
    if m.protected_dir is not None:
        return Method(name, m, None, Path(m.protected_dir))
    if m.command is None:
        return Method(name, m)  # the clean training set
    method_dir = work_dir / "methods" / name
    return Method(name, m, method_dir, method_dir / "protected")


def _check_grid(sweep: Sweep, key: str, values: list[Any]) -> None:
    where = f"{sweep.path}: grid.{key}"
    if not values:
        raise SweepError(f"{where}: expected a non-empty list")
    if len(set(map(str, values))) != len(values):
        raise SweepError(f"{where}: duplicate values in {values!r}")
    if key == "method" and (missing := [m for m in values if m not in sweep.methods]):
        raise SweepError(f"{where}: {missing} not defined under methods ({sorted(sweep.methods)})")
    if key == "arch":
        from fuse_lightning.nets import available_classifiers

        if unknown := [a for a in values if a not in available_classifiers()]:
            raise SweepError(f"{where}: unknown {unknown}; available: {available_classifiers()}")
    if key == "filter":
        from fuse_lightning.filters import filter_from_name

        for name in values:
            try:
                canonical = filter_from_name(name).name
            except ValueError as exc:
                raise SweepError(f"{where}: {exc}") from None
            if canonical != name:  # run ids and tables use the name: one spelling per filter
                raise SweepError(f"{where}: {name!r} should be written {canonical!r}")


def missing_files(sweep: Sweep) -> list[str]:
    """Config files of the victim and of the grid's methods that do not exist."""
    configs = list(sweep.spec.victim.configs)
    configs += [c for m in dict.fromkeys(sweep.grid.method) for c in sweep.methods[m].spec.configs]
    return [c for c in dict.fromkeys(configs) if not Path(c).is_file()]


# --------------------------------------------------------------------------------------------
# Grid and commands
# --------------------------------------------------------------------------------------------


def cell_id(method: str, arch: str, filt: str) -> str:
    """A grid cell's id, `<method>__<arch>__<filter>`: its runs' ids add `__s<seed>`."""
    return f"{method}__{arch}__{filt}"


def make_run(sweep: Sweep, method: str, arch: str, filt: str, seed: int) -> Run:
    """One victim run, with id `<method>__<arch>__<filter>__s<seed>` and its dir in the work dir."""
    run_id = f"{cell_id(method, arch, filt)}__s{seed}"
    run_dir = sweep.work_dir / "runs" / run_id
    return Run(method, arch, filt, int(seed), run_id, run_dir, run_dir / "result.json")


def expand_grid(sweep: Sweep) -> list[Run]:
    """All grid points, method-major (then arch, filter, seed), with id `<method>__<arch>__<filter>__s<seed>`."""
    g = sweep.grid
    return [make_run(sweep, *point) for point in itertools.product(g.method, g.arch, g.filter, g.seed)]


_SEED_SUFFIX = re.compile(r"^(?P<cell>.+)__s(?P<seed>[0-9]+)$")


def runs_with_extra_seeds(sweep: Sweep) -> list[Run]:
    """The grid's runs, each cell followed by its runs at seeds the grid does not list that ran
    before (seeds ascending): a cell given more seeds than the others by a narrowed pass
    (`--grid.method [fuse] --grid.seed [3]`). Those are found by run id in the committed
    results.csv and in the work dir's `runs/`; whether each is current is for the caller to check
    (`current_result`). Without them, the next pass that does not name those seeds would drop
    their rows from results.csv (a report covers the file's grid plus the command line's)."""
    g = sweep.grid
    listed = {int(s) for s in g.seed}
    ids = set(recorded_results(sweep))
    try:
        ids.update(p.name for p in (sweep.work_dir / "runs").iterdir() if p.is_dir())
    except OSError:  # no work dir yet (a fresh clone)
        pass
    extra: dict[str, set[int]] = {}
    for run_id in ids:
        if (match := _SEED_SUFFIX.match(run_id)) and int(match["seed"]) not in listed:
            extra.setdefault(match["cell"], set()).add(int(match["seed"]))
    return [make_run(sweep, method, arch, filt, seed)
            for method, arch, filt in itertools.product(g.method, g.arch, g.filter)
            for seed in [*g.seed, *sorted(extra.get(cell_id(method, arch, filt), ()))]]


def flag_value(value: Any) -> str:
    """A config value as one command-line word (`true`, `null`, `5000`, `[0.1, 0.5]`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def cli_command(command: str, configs: Sequence[str], overrides: dict[str, Any]) -> list[str]:
    """`<this python> -m fuse_lightning <command> --config ... --<key> <value> ...`."""
    words = [sys.executable, "-m", "fuse_lightning", command]
    for config in configs:
        words += ["--config", str(config)]
    for key, value in overrides.items():
        words += [f"--{key}", flag_value(value)]
    return words


def prepare_command(method: Method, data_dir: str | os.PathLike) -> list[str] | None:
    """The command that makes a method's protected set (None without a command)."""
    spec = method.spec
    if spec.command is None or method.method_dir is None:
        return None
    words = cli_command(spec.command, spec.configs, spec.overrides) + ["--data.init_args.data_dir", str(data_dir)]
    if spec.command == "fit":  # ProtectOnFitEnd exports to <default_root_dir>/protected
        return words + ["--trainer.default_root_dir", str(method.method_dir)]
    return words + ["--out", str(method.protected_dir)]


def victim_command(sweep: Sweep, run: Run, data_dir: str | os.PathLike) -> list[str]:
    """The `fit` of one victim: logs, checkpoints and `result.json` (ResultWriter) land in `run.run_dir`."""
    victim, method = sweep.spec.victim, sweep.methods[run.method]
    overrides = {**victim.overrides, **victim.arch_overrides.get(run.arch, {}), **method.spec.victim_overrides}
    words = cli_command("fit", victim.configs, overrides) + ["--data.init_args.data_dir", str(data_dir)]
    protected = method.protected_dir
    if protected is not None:
        words += ["--data.init_args.protected_dir", str(protected)]
    if run.filter != "none":
        words += ["--data.init_args.train_filter", run.filter]
        if sweep.spec.filter_test_set:
            words += ["--data.init_args.test_filter", run.filter]
    return words + ["--model.init_args.arch", run.arch, "--seed_everything", str(run.seed),
                    "--trainer.default_root_dir", str(run.run_dir), f"--trainer.callbacks+={RESULT_WRITER}"]


# --------------------------------------------------------------------------------------------
# Keys: which finished runs and prepared sets belong to the sweep's current settings
# --------------------------------------------------------------------------------------------


def portable(words: Sequence[str | os.PathLike]) -> list[str]:
    """A command without this machine's paths: the interpreter written `python`, absolute paths
    relative to the working directory (the repository root, where sweeps run)."""
    out = []
    for word in map(str, words):
        if word == sys.executable:
            word = "python"
        elif os.path.isabs(word):
            word = os.path.relpath(word)
        out.append(word)
    return out


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def prepare_key(method: Method, data_dir: str | os.PathLike) -> str | None:
    """sha256 of the method's command as it would run now (None without a command)."""
    cmd = prepare_command(method, data_dir)
    return None if cmd is None else _digest(portable(cmd))


def run_key(sweep: Sweep, run: Run, data_dir: str | os.PathLike) -> str:
    """sha256 of the victim command and of its method's `prepare_key`: what the result depends on."""
    command = portable(victim_command(sweep, run, data_dir))
    return _digest({"command": command, "prepare": prepare_key(sweep.methods[run.method], data_dir)})


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_result(run: Run) -> dict[str, Any] | None:
    """The run's `result.json`, or None."""
    return read_json(run.result_path)


@functools.lru_cache(maxsize=8)
def _read_recorded(path: str, mtime_ns: int, size: int) -> dict[str, dict[str, Any]]:
    try:
        rows = R.read_csv_rows(path)
    except ValueError as err:
        raise SweepError(f"{err} (the recorded results)") from err
    return {row["run_id"]: row for row in rows if row.get("run_id")}


def recorded_results(sweep: Sweep) -> dict[str, dict[str, Any]]:
    """Rows of the sweep's committed `results.csv`, by run id (CSV only: nothing in the file is
    executed). Work directories are not committed; this record is, so a fresh clone, or a machine
    that lost its work dir, keeps the finished runs (rows without a `run_key` are never current)."""
    path = sweep.results_dir / "results.csv"
    try:
        stat = path.stat()
    except OSError:
        return {}
    return _read_recorded(str(path), stat.st_mtime_ns, stat.st_size)


def _holds_current_key(sweep: Sweep, run: Run, row: dict[str, Any], data_dir: str | os.PathLike | None) -> bool:
    if data_dir is None and row.get("data_dir") is None:
        return False
    return row.get("run_key") == run_key(sweep, run, data_dir if data_dir is not None else row["data_dir"])


def current_result(sweep: Sweep, run: Run, data_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The run's result if it holds the `run_key` of the command the sweep would run now: its
    `result.json`, else its row in the committed `results.csv` (`recorded_results`); None when
    neither does (`data_dir` None: with the data dir the result records, as `--report_only` does).

    A recorded row of a method with a command stays current when that method's protected set is
    made again by the same command: the key covers the commands, not the bytes they produce.
    """
    for row in (read_result(run), recorded_results(sweep).get(run.run_id)):
        if row is not None and _holds_current_key(sweep, run, row, data_dir):
            return dict(row)
    return None


def result_is_current(sweep: Sweep, run: Run, data_dir: str | os.PathLike | None) -> bool:
    """Whether the run has a current result (`current_result`)."""
    return current_result(sweep, run, data_dir) is not None


def method_is_current(method: Method, data_dir: str | os.PathLike) -> bool:
    """Whether a method's training set exists and, if it has a command, was made by the current one."""
    if not method.is_prepared:
        return False
    if method.record_path is None:
        return True
    record = read_json(method.record_path)
    return record is not None and record.get("key") == prepare_key(method, data_dir)
