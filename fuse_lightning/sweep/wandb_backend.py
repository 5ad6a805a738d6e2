"""`--backend wandb`: a W&B grid sweep whose victims log live to W&B.

The launcher (`fuse sweep FILE --backend wandb`) prepares every method's protected set once, here,
and logs it as a W&B artifact (`fuse_lightning.wandb_artifacts`); it records method -> artifact
reference in `<work_dir>/wandb_artifacts.json` and in the sweep's constant parameter
`protected_sets`. It then registers the sweep (grid over method, arch, filter, seed; metric
`val/acc`) and serves it with an in-process agent; more machines join with `wandb agent`. Each
trial (`--agent_run`) reads its grid point from the agent, fetches the method's set from its
artifact (sha256-checked) and trains the victim with `configs/logger/wandb.yaml`: the victim's
WandbLogger is the sweep's run (group = sweep name, tags method/arch/filter). At the end the
launcher writes the report and a summary run with the results table and the plots.

Without the W&B server (WANDB_MODE=offline) there is no sweep to register: the launcher walks the
same grid itself, each point exactly as an agent would run it (offline runs, synced later).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from fuse_lightning import results as R
from fuse_lightning.sweep import local as L
from fuse_lightning.sweep import spec as S
from fuse_lightning.sweep.spec import Method, MethodSpec, Run, Sweep, SweepError

LOGGER_CONFIG = "configs/logger/wandb.yaml"
ARTIFACTS_FILE = "wandb_artifacts.json"


def _wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise SweepError("--backend wandb needs the wandb package: pip install wandb") from None
    return wandb


def is_offline() -> bool:
    """Whether W&B runs without its server (WANDB_MODE offline, dryrun or disabled)."""
    return os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled")


def where(sweep: Sweep) -> tuple[str, str | None]:
    """(project, entity): the sweep file's, else $WANDB_PROJECT / $WANDB_ENTITY, else fuse-lightning."""
    project = sweep.spec.wandb.project or os.environ.get("WANDB_PROJECT") or "fuse-lightning"
    return project, sweep.spec.wandb.entity or os.environ.get("WANDB_ENTITY")


def publish(sweep: Sweep, data_dir: str, executor: L.Executor = L.execute) -> dict[str, str] | None:
    """Prepare the grid's protected sets here and log each as an artifact (again only when its
    manifest changed); method -> reference, also written to `<work_dir>/wandb_artifacts.json`.
    None when a preparation failed."""
    from fuse_lightning.wandb_artifacts import log_protected_set

    names = [m for m in sweep.grid.method if sweep.methods[m].protected_dir is not None]
    if L.prepare_methods(sweep, names, data_dir, executor):
        return None
    path = sweep.work_dir / ARTIFACTS_FILE
    record = S.read_json(path) or {}
    for name in names:
        manifest = hashlib.sha256((sweep.methods[name].protected_dir / "manifest.json").read_bytes()).hexdigest()
        if record.get(name, {}).get("manifest") != manifest:
            ref = log_protected_set(sweep.methods[name].protected_dir, f"{sweep.name}-{name}", project=where(sweep)[0])
            record[name] = {"ref": ref, "manifest": manifest}
            R.atomic_write_text(path, json.dumps(record, indent=2))
            print(f"[wandb] {name}: protected set logged as artifact {ref}")
    return {name: record[name]["ref"] for name in names}


def recorded_refs(sweep: Sweep) -> dict[str, str]:
    """Method -> artifact reference, as the launcher recorded them in `<work_dir>/wandb_artifacts.json`."""
    return {k: v["ref"] for k, v in (S.read_json(sweep.work_dir / ARTIFACTS_FILE) or {}).items()}


def local_copy(sweep: Sweep, ref: str) -> Path:
    """Where a trial keeps the artifact `ref`: `<work_dir>/artifacts/<name>-<version>`."""
    return sweep.work_dir / "artifacts" / ref.rsplit("/", 1)[-1].replace(":", "-")


def from_artifacts(sweep: Sweep, refs: dict[str, str], fetch: tuple[str, ...] = ()) -> Sweep:
    """The sweep with each method's protected set taken from its artifact's local copy (those
    named in `fetch` are downloaded and verified first); runs keyed on the artifact version."""
    methods = dict(sweep.methods)
    for name, ref in refs.items():
        local = local_copy(sweep, ref)
        if name in fetch:
            from fuse_lightning.wandb_artifacts import fetch_protected_set

            local = Path(fetch_protected_set(ref, local, project=where(sweep)[0]))
        methods[name] = Method(name, MethodSpec(protected_dir=str(local)), None, local)
    return replace(sweep, methods=methods)


def logger_args(sweep: Sweep, run: Run) -> list[str]:
    """Victim flags that log live to W&B: the logger config, project, group, name and tags."""
    project, entity = where(sweep)
    words = ["--config", LOGGER_CONFIG, "--trainer.logger.init_args.project", project,
             "--trainer.logger.init_args.group", sweep.name, "--trainer.logger.init_args.name", run.run_id,
             "--trainer.logger.init_args.job_type", "victim",
             "--trainer.logger.init_args.tags", json.dumps([run.method, run.arch, run.filter])]
    return words + (["--trainer.logger.init_args.entity", entity] if entity else [])


def sweep_config(sweep: Sweep, refs: dict[str, str]) -> dict[str, Any]:
    """The W&B sweep: a grid over method/arch/filter/seed, `protected_sets` constant, `--agent_run` trials."""
    parameters: dict[str, Any] = {k: {"values": list(getattr(sweep.grid, k))} for k in S.GRID_KEYS}
    parameters["protected_sets"] = {"value": refs}
    return {"name": sweep.name, "method": "grid", "metric": {"name": "val/acc", "goal": "minimize"},
            "parameters": parameters,
            "command": ["${env}", "${interpreter}", "-m", "fuse_lightning", "sweep", str(sweep.path),
                        "--backend", "wandb", "--agent_run"]}


def trial(sweep: Sweep, data_dir: str, params: dict[str, Any], executor: L.Executor = L.execute) -> dict[str, Any]:
    """One grid point as an agent runs it (`params`: `method`, `arch`, `filter`, `seed`,
    `protected_sets`): fetch its protected set, train the victim logging live; the result row."""
    point = (params["method"], params["arch"], params["filter"], int(params["seed"]))
    run = next((r for r in S.expand_grid(sweep) if (r.method, r.arch, r.filter, r.seed) == point), None)
    if run is None:
        raise SweepError(f"{sweep.path}: the W&B trial {point} is not a point of this grid")
    refs = params.get("protected_sets") or recorded_refs(sweep)
    sweep = from_artifacts(sweep, refs, fetch=(run.method,) if run.method in refs else ())
    env, extra = L.pin((L.visible_gpus() or [None])[0])
    return L.execute_run(sweep, run, data_dir, env, extra + logger_args(sweep, run), executor)


def agent_params() -> dict[str, Any]:
    """The grid point a W&B agent handed this process (the file named by WANDB_SWEEP_PARAM_PATH)."""
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path:
        raise SweepError("--agent_run runs one trial of a W&B agent; start agents with `wandb agent SWEEP`")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return {k: v["value"] for k, v in raw.items() if isinstance(v, dict) and "value" in v}


def agent_trial(sweep: Sweep, data_dir: str, executor: L.Executor = L.execute) -> int:
    """`--agent_run`: the trial an agent handed out; exit status 1 when the victim failed."""
    row = trial(sweep, data_dir, agent_params(), executor)
    if "error" in row:
        print(f"{row['run_id']} failed: {row['error']}\n{row['tail']}", file=sys.stderr)
    return 1 if "error" in row else 0


def _agent_function(sweep: Sweep, data_dir: str) -> None:
    if agent_trial(sweep, data_dir):
        sys.exit(1)  # the agent process's exit code marks the trial failed


def serve(sweep: Sweep, data_dir: str, refs: dict[str, str], max_runs: int | None) -> None:
    """Register the W&B sweep and serve it with an agent in this process."""
    wandb = _wandb()
    project, entity = where(sweep)
    try:
        sweep_id = wandb.sweep(sweep_config(sweep, refs), project=project, entity=entity)
    except Exception as exc:  # noqa: BLE001 - network / auth errors come in many types
        raise SweepError(f"could not register the W&B sweep ({type(exc).__name__}: {exc}); check "
                         "`wandb login` and the network, or use WANDB_MODE=offline / --backend local") from None
    path = "/".join(p for p in (entity, project, sweep_id) if p)
    print(f"W&B sweep {path}; more machines join with: wandb agent {path}")
    wandb.agent(sweep_id, function=lambda: _agent_function(sweep, data_dir), project=project, entity=entity,
                count=max_runs)


def run(sweep: Sweep, data_dir: str, dry_run: bool = False, max_runs: int | None = None, agent_run: bool = False,
        executor: L.Executor = L.execute, new_data_dir: bool = False) -> int:
    """`fuse sweep FILE --backend wandb`: publish the sets, serve the sweep (or walk it offline), report.
    As with the local backend, finished runs recorded under another data dir are not run again
    unless `new_data_dir` (checked on the recorded artifacts, before anything is prepared)."""
    _wandb()
    if agent_run:
        return agent_trial(sweep, data_dir)
    if not new_data_dir:
        recorded = from_artifacts(sweep, recorded_refs(sweep))
        L.check_data_dir(recorded, L.pending_runs(recorded, S.expand_grid(recorded), data_dir), data_dir)
    if dry_run:
        refs = {m: f"{sweep.name}-{m}:<logged at launch>" for m in sweep.grid.method if sweep.methods[m].protected_dir}
        print(yaml.safe_dump(sweep_config(sweep, refs), sort_keys=False))
        L.prepare_methods(sweep, sweep.grid.method, data_dir, dry_run=True)
        for r in S.expand_grid(sweep):
            print(f"# {r.run_id}\n{shlex.join(S.victim_command(sweep, r, data_dir) + logger_args(sweep, r))}")
        return 0
    refs = publish(sweep, data_dir, executor)
    if refs is None:
        return 1
    if not is_offline():
        serve(sweep, data_dir, refs, max_runs)
        return report(sweep, data_dir)
    print(f"[wandb] WANDB_MODE={os.environ['WANDB_MODE']}: no sweep server; walking the grid here, "
          "each point as an agent runs it")
    local = from_artifacts(sweep, refs, fetch=tuple(refs))
    summary = L.run_victims(local, S.expand_grid(local), data_dir, L.visible_gpus(), max_runs, executor,
                          run_args=lambda r: logger_args(local, r))
    code = L.finish(local, data_dir, summary)
    log_summary(local, data_dir)
    return code


def report(sweep: Sweep, data_dir: str | None) -> int:
    """The report of the runs made from the recorded artifacts, and the summary run (`--report_only`)."""
    local = from_artifacts(sweep, recorded_refs(sweep))
    L.write_sweep_report(local, data_dir=data_dir)
    log_summary(local, data_dir)
    return 0


def log_summary(sweep: Sweep, data_dir: str | None) -> None:
    """A W&B run grouped with the victims: the results as a `wandb.Table`, the report's plots as images."""
    wandb = _wandb()
    project, entity = where(sweep)
    sweep.work_dir.mkdir(parents=True, exist_ok=True)
    summary = wandb.init(project=project, entity=entity, group=sweep.name, job_type="summary",
                         name=f"{sweep.name}-summary", dir=str(sweep.work_dir))
    rows = L.sweep_rows(sweep, data_dir)
    columns = [c for c in R.RESULT_FIELDS if c != "command"]
    images = {p.stem: wandb.Image(str(p)) for p in sorted(sweep.results_dir.glob("*.png"))}
    summary.log({"results": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows]), **images})
    summary.finish()
