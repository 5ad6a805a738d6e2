"""The local backend: prepare the protected sets, run the victims here, write the report.

Victims run one after another on CPU, or one per visible GPU in parallel. Every child runs in its
own process group; Ctrl-C or SIGTERM stops the running groups, records nothing for them, and a
rerun resumes (finished runs hold their `run_key`; a stopped victim continues from its
checkpoint).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
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

from fuse_lightning import results as R
from fuse_lightning.manifest import content_fingerprint
from fuse_lightning.sweep import spec as S
from fuse_lightning.sweep.spec import Method, Run, Sweep

Executor = Callable[[list[str], Path, "dict[str, str] | None"], int]
RESULT_KEYS = ("val_acc", "best_val_acc", "train_acc", "epochs", "num_classes")


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was told to stop (SIGTERM, or a child killed while stopping); nothing is recorded."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------

_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()
_STOPPING = threading.Event()


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the child's process group, wait up to `grace_s`, then SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the leader is gone; e.g. dataloader workers
        return


def stop_children(grace_s: float = 10.0) -> int:
    """Stop every running child of `execute` and refuse new ones; returns how many ran."""
    _STOPPING.set()
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for proc in children:
        _kill_group(proc, grace_s)
    return len(children)


def execute(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Run a command in its own process group, output appended to `log_path`; its exit code.

    Raises:
        SweepInterrupted: The sweep is stopping (the child was stopped by `stop_children`).
    """
    if _STOPPING.is_set():
        raise SweepInterrupted()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
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
    """Run the body with SIGTERM raising `SweepInterrupted`, stopping every child if it raises."""

    def on_term(signum, frame):
        raise SweepInterrupted(signum)

    _STOPPING.clear()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main else None
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
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


# --------------------------------------------------------------------------------------------
# Preparing methods, running victims
# --------------------------------------------------------------------------------------------


def _remove_checkpoints(run_dir: Path) -> None:
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        ckpt.unlink()


def _victim_attempt(run: Run, key: str, log_path: Path) -> tuple[Path | None, float]:
    """The checkpoint to resume a victim from, and the wall time of the attempts before it.

    Every attempt writes `attempt.json` (the run's `run_key`, `earlier_wall_s`, and `started_unix`
    while it runs) before its command starts. An unfinished attempt of the same `run_key` that left
    `checkpoints/last.ckpt` is continued from there: the victim's data order and augmentation
    depend on the seed, epoch and batch alone, so the resumed run ends where an uninterrupted one
    would. The victim configs' ModelCheckpoint has no monitor, so `last.ckpt` is the last finished
    epoch (a monitored one rewrites it only on a new best). An attempt killed without writing
    its end is counted until the last write to its `run.log`. Checkpoints of another `run_key`, or
    without a record, are deleted.
    """
    record = S.read_json(run.run_dir / "attempt.json")
    last = run.run_dir / "checkpoints" / "last.ckpt"
    if record is None or record.get("run_key") != key or not last.is_file():
        _remove_checkpoints(run.run_dir)
        return None, 0.0
    return last, _unfinished_wall_s(record, log_path)


def execute_run(sweep: Sweep, run: Run, data_dir: str | os.PathLike, env: dict[str, str] | None = None,
                extra_args: Sequence[str] = (), executor: Executor = execute) -> dict[str, Any]:
    """Train one victim; turn the `result.json` of its ResultWriter into the sweep's result row.

    `env` (e.g. `CUDA_VISIBLE_DEVICES`) and `extra_args` (device, logger flags; not part of
    `run_key`) go to the child; `executor` runs it (replaceable in tests). A run interrupted
    earlier (sweep stopped, machine lost) resumes from its `last.ckpt`, and its `wall_s` sums the
    attempts (`_victim_attempt`). Returns the row written to `result.json`, or on failure
    `{"run_id", "error", "log", "tail"}`, written to `failed.json`.
    """
    cmd = S.victim_command(sweep, run, data_dir) + list(extra_args)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if run.result_path.exists():  # of other settings: it and its checkpoints are not this run's
        run.result_path.unlink()
        _remove_checkpoints(run.run_dir)
    log_path = run.run_dir / "run.log"
    key = S.run_key(sweep, run, data_dir)
    attempt_path = run.run_dir / "attempt.json"
    resume_from, earlier = _victim_attempt(run, key, log_path)
    # Written before the command starts, so that a sweep killed mid-run still leaves its time.
    R.atomic_write_text(attempt_path, json.dumps(
        {"run_key": key, "earlier_wall_s": round(earlier, 1), "started_unix": time.time()}, indent=2))
    child = cmd + (["--ckpt_path", str(resume_from)] if resume_from else [])
    start = time.perf_counter()
    try:
        code = executor(child, log_path, env)
    finally:
        wall = time.perf_counter() - start
        written = S.read_result(run) or {}
        if written.get("val_acc") is None:  # unfinished: its time joins the earlier ones
            R.atomic_write_text(attempt_path, json.dumps(
                {"run_key": key, "earlier_wall_s": round(earlier + wall, 1)}, indent=2))
    wall += earlier
    if code != 0 or written.get("val_acc") is None:
        run.result_path.unlink(missing_ok=True)
        # A failed child (not an interrupted one) may have left a broken checkpoint: start over next time.
        _remove_checkpoints(run.run_dir)
        attempt_path.unlink(missing_ok=True)
        error = f"exit code {code}" if code != 0 else "no val/acc logged (no result.json from ResultWriter)"
        failure = {"run_id": run.run_id, "error": error, "log": str(log_path), "tail": log_tail(log_path)}
        R.atomic_write_text(run.run_dir / "failed.json", json.dumps(failure, indent=2))
        return failure
    protected = sweep.methods[run.method].protected_dir
    row = {"run_id": run.run_id, "method": run.method, "arch": run.arch, "filter": run.filter, "seed": run.seed,
           **{k: written.get(k) for k in RESULT_KEYS}, "wall_s": round(wall, 1),
           "protected_dir": S.portable([protected])[0] if protected else None,
           # Which set the victim trained on: a set made again (a lost work dir) gets another
           # fingerprint unless it is byte-identical, so its runs can be told apart.
           "protected_fingerprint": content_fingerprint(protected) if protected else None,
           "data_dir": S.portable([data_dir])[0], "run_key": key,
           "command": shlex.join(S.portable(cmd))}
    R.atomic_write_text(run.result_path, json.dumps(row, indent=2))
    (run.run_dir / "failed.json").unlink(missing_ok=True)
    attempt_path.unlink(missing_ok=True)
    if not sweep.spec.keep_checkpoints:
        _remove_checkpoints(run.run_dir)
    return row


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
    log(f"[prepare] {method.name}: {old} was made by another command; moved to {aside}, preparing again")


def _earlier_attempts_s(method: Method, key: str, log_path: Path) -> float:
    """Wall time spent by earlier, unfinished attempts of the same preparation command.

    A preparation that resumes (a FUSE fit from its last checkpoint, EM from its state file)
    continues the work of the attempts before it, so its set's time is the sum of all of them.
    An attempt leaves an unfinished record (`earlier_wall_s`, plus `started_unix` while it
    runs); one that was killed without writing its end is counted until the last write to its
    `prepare.log` (`log_path`), the best evidence of when it stopped.
    """
    record = S.read_json(method.record_path)
    if record is None or record.get("key") != key or "wall_s" in record:
        return 0.0  # no attempt, another command's, or a finished one (its set was removed by hand)
    return _unfinished_wall_s(record, log_path)


def _unfinished_wall_s(record: dict[str, Any], log_path: Path) -> float:
    """Wall time of the unfinished attempts an attempt record describes: their `earlier_wall_s`,
    plus, for one killed while running (`started_unix` still there), the time until the last write
    to its log."""
    earlier = float(record.get("earlier_wall_s", 0.0))
    if "started_unix" in record:
        with contextlib.suppress(OSError):
            earlier += max(0.0, log_path.stat().st_mtime - float(record["started_unix"]))
    return earlier


def _prepare_one(method: Method, data_dir: str | os.PathLike, executor: Executor, log: Callable[[str], None]) -> bool:
    cmd = S.prepare_command(method, data_dir)
    if cmd is None:
        log(f"[prepare] {method.name}: {method.protected_dir} has no manifest.json and the method no command")
        return False
    key = S.prepare_key(method, data_dir)
    log_path = method.method_dir / "prepare.log"
    earlier = _earlier_attempts_s(method, key, log_path)
    _set_aside(method, log)
    record = {"key": key, "command": S.portable(cmd)}
    # Written before the command starts, so that a sweep killed mid-preparation still leaves its time.
    R.atomic_write_text(method.record_path, json.dumps(
        {**record, "earlier_wall_s": round(earlier, 1), "started_unix": time.time()}, indent=2))
    log(f"[prepare] {method.name}: {shlex.join(S.portable(cmd))}")
    start = time.perf_counter()
    try:
        code = executor(cmd, log_path, None)
    finally:
        wall = time.perf_counter() - start
        if not method.is_prepared:  # interrupted or failed: this attempt's time joins the earlier ones
            R.atomic_write_text(method.record_path, json.dumps(
                {**record, "earlier_wall_s": round(earlier + wall, 1)}, indent=2))
    took = f"{wall:.0f}s" + (f" ({earlier + wall:.0f}s with {earlier:.0f}s of earlier attempts)" if earlier else "")
    if code != 0:
        log(f"[prepare] {method.name}: FAILED (exit {code}) after {took}; log {log_path}:\n{log_tail(log_path, 20)}")
        return False
    if not method.is_prepared:
        log(f"[prepare] {method.name}: the command succeeded but {method.protected_dir}/manifest.json is missing")
        return False
    record["wall_s"] = round(earlier + wall, 1)
    R.atomic_write_text(method.record_path, json.dumps(record, indent=2))
    log(f"[prepare] {method.name}: done in {took}")
    return True


def prepare_methods(sweep: Sweep, names: Sequence[str], data_dir: str | os.PathLike, executor: Executor = execute,
                    dry_run: bool = False, log: Callable[[str], None] = print) -> list[str]:
    """Make the protected sets that are missing or stale (`method_is_current`), one after another.

    A stale set is moved to `<protected_dir>.stale` first; the command's output goes to
    `<method_dir>/prepare.log`; `prepare.json` keeps its key and wall time (summed over the
    interrupted attempts a resumed preparation continues).

    Returns:
        Names of the methods whose preparation failed (their runs are skipped).
    """
    failed = []
    for name in dict.fromkeys(names):
        method = sweep.methods[name]
        if S.method_is_current(method, data_dir):
            continue
        if dry_run:
            cmd = S.prepare_command(method, data_dir)
            print(shlex.join(cmd) if cmd else f"# {name}: {method.protected_dir} is missing")
        elif not _prepare_one(method, data_dir, executor, log):
            failed.append(name)
    return failed


def methods_to_prepare(sweep: Sweep, pending: Sequence[Run]) -> list[str]:
    """The methods a pass must prepare for its `pending` runs (those without a current result):
    their methods, after the methods whose command makes a protected set such a method reads
    (e.g. `fuse_seen` reads `fuse`'s). A method whose runs are all done, in a work dir or in the
    committed results.csv, is not made again."""
    pending = list(dict.fromkeys(r.method for r in pending))
    needed = {os.path.abspath(d) for m in pending if (d := sweep.methods[m].protected_dir) is not None}
    makers = [name for name, m in sweep.methods.items() if name not in pending and m.spec.command is not None
              and m.protected_dir is not None and os.path.abspath(m.protected_dir) in needed]
    return makers + pending


def visible_gpus() -> list[str]:
    """Physical GPU ids this process may use (honours an existing CUDA_VISIBLE_DEVICES)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / broken driver: run on CPU
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def pin(device: str | None) -> tuple[dict[str, str] | None, list[str]]:
    """Environment and flags that put a victim on one GPU (none on CPU)."""
    if device is None:
        return None, []
    return {"CUDA_VISIBLE_DEVICES": device}, ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]


@dataclass
class RunSummary:
    """Outcome of `run_victims`."""

    finished: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    stale: int = 0


def run_victims(sweep: Sweep, runs: Sequence[Run], data_dir: str | os.PathLike, gpus: Sequence[str] = (),
                max_runs: int | None = None, executor: Executor = execute, log: Callable[[str], None] | None = None,
                run_args: Callable[[Run], list[str]] | None = None, runs_per_gpu: int = 1) -> RunSummary:
    """Run the victims without a current result: one at a time on CPU, `runs_per_gpu` at once on
    each GPU with GPUs.

    Args:
        sweep: The sweep.
        runs: Grid points (from `expand_grid`).
        data_dir: Dataset root.
        gpus: Physical GPU ids to use; empty means CPU.
        max_runs: Run at most this many of the pending runs.
        executor: Runs a command; replaceable in tests.
        log: Progress output (default: the progress bar's `write`).
        run_args: Extra victim flags per run, outside `run_key` (e.g. a W&B logger).
        runs_per_gpu: Victims sharing one GPU at once. A CPU-sized victim keeps a large GPU idle
            while its data loader decodes images, so several side by side finish sooner; each
            still sees one GPU and its own seed, so its result does not depend on this.
    """
    if runs_per_gpu < 1:
        raise ValueError(f"runs_per_gpu must be >= 1, got {runs_per_gpu}")
    from tqdm.auto import tqdm

    pending = pending_runs(sweep, runs, data_dir)
    summary = RunSummary(skipped=len(runs) - len(pending), stale=sum(r.result_path.is_file() for r in pending))
    pending = pending[:max_runs] if max_runs is not None else pending
    if not pending:
        return summary
    bar = tqdm(total=len(pending), desc=sweep.name, unit="run", dynamic_ncols=True)
    out, lock, counter, devices = log or bar.write, threading.Lock(), itertools.count(1), queue.Queue()
    slots = [device for device in gpus for _ in range(runs_per_gpu)] or [None]
    for device in slots:
        devices.put(device)

    def work(run: Run) -> None:
        device = devices.get()
        try:
            env, extra = pin(device)
            start = time.perf_counter()
            row = execute_run(sweep, run, data_dir, env, extra + (run_args(run) if run_args else []), executor)
        finally:
            devices.put(device)
        with lock:
            where = f"[{next(counter)}/{len(pending)}] {run.run_id}" + (f" gpu{device}" if device else "")
            (summary.failed if "error" in row else summary.finished).append(row)
            outcome = f"FAILED ({row['error']}) log: {row['log']}" if "error" in row else f"val/acc {100 * row['val_acc']:.2f}%"
            out(f"{where}  {outcome}  {time.perf_counter() - start:.0f}s")
            bar.update(1)

    with contextlib.closing(bar):
        _in_pool(work, pending, len(slots))
    return summary


def _in_pool(work: Callable[[Run], None], runs: Sequence[Run], workers: int) -> None:
    """`work` on every run in a thread pool; on any exception the children stop, queued runs drop."""
    pool = ThreadPoolExecutor(max_workers=workers)
    with stop_children_on_exit():
        try:
            for future in [pool.submit(work, r) for r in runs]:
                future.result()
        except BaseException:
            stop_children()  # before waiting for the workers: they wait for their children
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def split_results(sweep: Sweep, data_dir: str | os.PathLike | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Current results of the grid, in grid order, and the ids of stale ones (`result_is_current`).
    A cell's runs at seeds beyond the grid's (`runs_with_extra_seeds`) follow its grid seeds."""
    rows, stale = [], []
    for run in S.runs_with_extra_seeds(sweep):
        if (row := S.current_result(sweep, run, data_dir)) is not None:
            rows.append(row)
        elif run.result_path.is_file():
            stale.append(run.run_id)
    return rows, stale


def sweep_rows(sweep: Sweep, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Current results of the grid, in grid order (stale ones left out)."""
    return split_results(sweep, data_dir)[0]


def _duration(seconds: float) -> str:
    """Hours for long work, minutes for short (a GPU sweep's 0.0 h says nothing)."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def compute_used(sweep: Sweep, rows: Sequence[dict[str, Any]], data_dir: str | os.PathLike | None = None) -> str:
    """One sentence on the wall time behind `rows`: the victims' (`wall_s` of each row, kept in
    results.csv) and making the protected sets they trained on (`wall_s` of each method's
    prepare.json in this work dir, where recorded and, given `data_dir`, current)."""
    victims = [float(r["wall_s"]) for r in rows if r.get("wall_s") not in (None, "")]
    text = f"Wall time: victims {_duration(sum(victims))} ({len(victims)} run{'s' * (len(victims) != 1)})"
    read = {os.path.abspath(d) for r in rows if (d := sweep.methods[r["method"]].protected_dir) is not None}
    made = [m for m in sweep.methods.values()  # the methods whose command made a set these rows read
            if m.spec.command is not None and m.protected_dir is not None and os.path.abspath(m.protected_dir) in read]
    ledger = read_prepare_times(sweep)
    recorded = {}
    for method in made:
        key = None if data_dir is None else S.prepare_key(method, data_dir)
        seconds = _finished_wall_s(method, key)
        if seconds is None and key in ledger:  # made on another machine or in a work dir since removed
            seconds = ledger[key]["wall_s"]
        if seconds is not None:
            recorded[method.name] = seconds
    made_time = _duration(sum(recorded.values()))
    if made and len(recorded) == len(made):
        text += f"; making the protected sets {made_time} (all {len(made)})"
    elif recorded:
        text += (f"; making the protected sets {made_time} for the {len(recorded)} of {len(made)} whose time is "
                 f"recorded ({', '.join(recorded)}); {_UNRECORDED}")
    elif made:
        text += f"; making the {len(made)} protected sets: no time recorded ({_UNRECORDED})"
    return text + "."


# Why a set's time can be missing: the sweep records it in `prepare.json` when it makes the set,
# and the report copies it into the committed `prepare_times.json`.
_UNRECORDED = "a set made before times were recorded has none"


def _seconds(value: Any) -> float | None:
    """A number of seconds read from JSON, or None (a string or a boolean is not one)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _finished_wall_s(method: Method, key: str | None) -> float | None:
    """The wall time `prepare.json` in the work dir records for the method's finished
    preparation with `key` (any key when None); None when there is none."""
    record = (S.read_json(method.record_path) if method.record_path is not None else None) or {}
    return None if key is not None and record.get("key") != key else _seconds(record.get("wall_s"))


def prepare_times_path(sweep: Sweep) -> Path:
    """The committed record of how long each protected set took to make, next to results.csv."""
    return sweep.results_dir / "prepare_times.json"


def read_prepare_times(sweep: Sweep) -> dict[str, dict[str, Any]]:
    """`prepare_times.json`: `{prepare_key: {"method": name, "wall_s": seconds}}` (JSON only:
    nothing in the file is executed); {} when missing or unreadable. Entries without a number
    of seconds are left out."""
    ledger = S.read_json(prepare_times_path(sweep)) or {}
    return {k: {**v, "wall_s": seconds} for k, v in ledger.items()
            if isinstance(v, dict) and (seconds := _seconds(v.get("wall_s"))) is not None}


def record_prepare_times(sweep: Sweep, data_dir: str | os.PathLike) -> bool:
    """Copy the time of every current, finished preparation in the work dir (`prepare.json`)
    into `prepare_times.json`, so the report keeps it after the work dir is gone (work dirs are
    not committed, like the runs whose rows results.csv keeps). Entries of other keys stay:
    the record only grows. Returns whether the file changed."""
    ledger = read_prepare_times(sweep)
    changed = False
    for method in sweep.methods.values():
        key = S.prepare_key(method, data_dir)
        if key is None or (seconds := _finished_wall_s(method, key)) is None:
            continue  # no command (clean data, a set read as given), or not made here
        entry = {"method": method.name, "wall_s": seconds}
        if ledger.get(key) != entry:
            ledger[key], changed = entry, True
    if changed:
        R.atomic_write_text(prepare_times_path(sweep), json.dumps(dict(sorted(ledger.items())), indent=2) + "\n")
    return changed


def superseded_path(sweep: Sweep) -> Path:
    """The committed record of the rows that left results.csv, next to it."""
    return sweep.results_dir / "results_superseded.csv"


# What tells two records of one run apart: another command or set, or another number.
_ROW_IDENTITY = ("run_id", "run_key", "command", "protected_fingerprint", "val_acc")


def _identity(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(k) for k in _ROW_IDENTITY)


def keep_superseded(sweep: Sweep, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append to `results_superseded.csv` every row of the committed results.csv that the report
    about to be written drops or replaces with a different record (a run repeated on a set made
    again, or under other settings), so results.csv plus this file keep every finished run.
    Returns all superseded rows, the new ones included; the file is written only when it grows."""
    path = superseded_path(sweep)
    try:
        kept = R.read_csv_rows(path)
    except ValueError as err:
        raise S.SweepError(str(err)) from err
    current = {r["run_id"]: r for r in rows}
    seen = {_identity(r) for r in kept}
    new = []
    for run_id, old in S.recorded_results(sweep).items():
        now = current.get(run_id)
        identity = _identity(old)
        if (now is None or identity != _identity(now)) and identity not in seen:
            new.append(old)
            seen.add(identity)
    if new:
        R.write_csv(kept + new, path)
    return kept + new


def write_sweep_report(sweep: Sweep, log: Callable[[str], None] = print,
                       data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write results.csv, table.md and plots of the current results into `sweep.results_dir`,
    after copying the times of the protected sets made in the work dir into prepare_times.json."""
    rows, stale = split_results(sweep, data_dir)
    if data_dir is not None:
        record_prepare_times(sweep, data_dir)
    if stale:
        log(f"{sweep.name}: {len(stale)} stale result(s) left out of the report (settings changed since they "
            f"ran; rerun the sweep to replace them): {', '.join(stale[:5])}" + (" ..." if len(stale) > 5 else ""))
    current = {r["run_id"] for r in rows}
    superseded = keep_superseded(sweep, rows)
    if dropped := [i for i in S.recorded_results(sweep) if i not in current]:
        log(f"{sweep.name}: {len(dropped)} row(s) of {sweep.results_dir / 'results.csv'} leave it: not current "
            "(settings changed, recorded without a run key, or outside the grid): "
            + ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""))
    listed = {int(s) for s in sweep.grid.seed}
    beyond = sum(int(r["seed"]) not in listed for r in rows)
    seeds = sorted({r["seed"] for r in rows})
    usual_n = R.usual_seed_count(rows)
    over = (f"victim seeds {seeds}, mean ± std where a cell has several; most cells have n = {usual_n}, "
            "the others say (n=k)" if len(seeds) > 1 else f"seed {seeds[0] if seeds else '-'}")
    notes = (sweep.spec.description.strip() + "\n\n" if sweep.spec.description else "") + (
        "Clean test accuracy (%) of victims trained on each method's training set after the attacker's "
        f"filter (columns), at the final epoch; {over}. {len(rows) - beyond} of {len(S.expand_grid(sweep))} runs finished"
        + (f", plus {beyond} at victim seeds beyond the grid's, on cells given more seeds" if beyond else "")
        + (f" ({len(stale)} stale result(s) of older settings left out)" if stale else "")
        + f". Sweep file: `{S.portable([sweep.path])[0]}`. " + compute_used(sweep, rows, data_dir))
    return R.write_report(rows, sweep.results_dir, sweep.name, notes, methods=sweep.grid.method,
                          filters=sweep.grid.filter, log=log, pairs=sweep.spec.compare,
                          independent=S.independent_comparisons(sweep), superseded=superseded,
                          pools=sweep.spec.pools)


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


def print_plan(sweep: Sweep, data_dir: str | os.PathLike, only_prepare: bool = False) -> None:
    """`--dry_run`: the prepare commands still to run, then every victim command with its state."""
    runs = S.expand_grid(sweep)
    print(f"# {sweep.name}: {len(runs)} runs; work dir {sweep.work_dir}")
    prepare_methods(sweep, sweep.grid.method, data_dir, dry_run=True)
    for run in [] if only_prepare else runs:
        state = "done " if S.result_is_current(sweep, run, data_dir) else "stale " if run.result_path.is_file() else ""
        print(f"# {state}{run.run_id}\n{shlex.join(S.victim_command(sweep, run, data_dir))}")


def pending_runs(sweep: Sweep, runs: Sequence[Run], data_dir: str | os.PathLike) -> list[Run]:
    """The runs of `runs` without a current result under `data_dir`, in order."""
    return [r for r in runs if not S.result_is_current(sweep, r, data_dir)]


def check_data_dir(sweep: Sweep, pending: Sequence[Run], data_dir: str | os.PathLike) -> None:
    """Refuse to repeat finished runs only because the data dir is spelled differently: a pending
    run (not current under `data_dir`) whose result is current under the data dir it recorded (the
    same dataset copied elsewhere, or another one) would run again, hours of work on a large grid."""
    elsewhere = {}
    for run in pending:
        if row := S.current_result(sweep, run, None):
            elsewhere.setdefault(row["data_dir"], []).append(run.run_id)
    if elsewhere:
        recorded = ", ".join(f"{d} ({len(ids)} run(s), e.g. {ids[0]})" for d, ids in elsewhere.items())
        raise S.SweepError(
            f"{sum(map(len, elsewhere.values()))} finished run(s) were made with another data dir: {recorded}; "
            f"with --data_dir {data_dir} they would all run again (the run key covers the data path). Pass the "
            "recorded data dir to keep them (a link to this copy there will do), or --new_data_dir true to run "
            "them again on this one.")


def run_local(sweep: Sweep, data_dir: str | os.PathLike, dry_run: bool = False, only_prepare: bool = False,
              max_runs: int | None = None, executor: Executor = execute, report: Sweep | None = None,
              runs_per_gpu: int = 1, new_data_dir: bool = False) -> int:
    """Prepare the methods, run the pending victims, write the report (of `report`, default
    `sweep`: e.g. the file's whole grid when `sweep` is a narrowed pass); 1 if anything failed.

    Raises SweepError when finished runs were made with another data dir and would all run again
    (the run key covers the data path), unless `new_data_dir`."""
    runs = S.expand_grid(sweep)
    pending = pending_runs(sweep, runs, data_dir)
    if not new_data_dir:
        check_data_dir(sweep, pending, data_dir)
    if dry_run:
        print_plan(sweep, data_dir, only_prepare)
        return 0
    # --max_runs N: prepare only for the N runs this pass will run; the others keep waiting.
    chosen = pending[:max_runs] if max_runs is not None else pending
    names = sweep.grid.method if only_prepare else methods_to_prepare(sweep, chosen)
    failed_methods = prepare_methods(sweep, names, data_dir, executor)
    if only_prepare:
        return 1 if failed_methods else 0
    waiting = {r.run_id for r in pending[len(chosen):]}
    runnable = [r for r in runs if r.method not in failed_methods and r.run_id not in waiting]
    gpus = visible_gpus()
    done = len(runs) - len(pending)
    print(f"{sweep.name}: {len(runs)} runs, {done} already done, on "
          + (f"{len(gpus)} GPU(s) {','.join(gpus)}, {runs_per_gpu} victim(s) each at once" if gpus else "CPU"))
    summary = run_victims(sweep, runnable, data_dir, gpus, None, executor, runs_per_gpu=runs_per_gpu)
    blocked = sum(r.method in failed_methods for r in chosen)
    return finish(sweep, data_dir, summary, failed_methods, blocked, report)


def finish(sweep: Sweep, data_dir: str | os.PathLike, summary: RunSummary, failed_methods: Sequence[str] = (),
           blocked: int = 0, report: Sweep | None = None) -> int:
    """Write the report (of `report`, default `sweep`), print the table and a summary of every
    failure; the exit status."""
    write_sweep_report(report or sweep, data_dir=data_dir)
    if (table := sweep.results_dir / "table.md").is_file():
        print(table.read_text())
    problems = [f"prepare failed: {m} (log {sweep.methods[m].method_dir}/prepare.log)" for m in failed_methods]
    problems += [f"run failed: {f['run_id']} ({f['error']}; log {f['log']})" for f in summary.failed]
    print(f"{sweep.name}: {len(summary.finished)} finished ({summary.stale} of them replaced stale results), "
          f"{summary.skipped} skipped (done before), {len(summary.failed)} failed, "
          f"{blocked} blocked by a failed prepare")
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1 if problems else 0
