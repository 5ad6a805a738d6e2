"""`make gpu-check`: the project's whole GPU path in one bounded run (about 6 minutes on one GPU).

Stages (each one the command a user would type, run as a subprocess and timed):

1. `tests`    the GPU-marked tests (`pytest -m gpu`);
2. `bench`    `python -m fuse_lightning.bench` on the GPU (throughput and ratios, JSON);
3. `fuse`     FUSE on the full CIFAR-10 training set with `configs/fuse_cifar10.yaml` and the GPU
              trainer config (bf16), bounded by epochs and wall time; the fit ends by exporting
              the protected training set (all 50 000 images);
4. `protect`  `fuse protect` from the FUSE checkpoint: the 50 000 images again, images/s;
5. `victim_*` CIFAR-stem ResNet-18 victims on clean and FUSE data, with no filter and with the
              ideal low-pass at 0.5 Nyquist: clean test accuracy and training images/s;
6. `sweep`    `fuse sweep configs/sweeps/gpu_check.yaml`: the local backend's one-victim-per-GPU
              path on a two-point grid.

Everything a stage writes goes under `--work_dir` (configs/ is linked there, so the shipped
configs' relative output paths land inside it). The report (`report.md`, `report.json`, and
`logs.txt` with the tail of every stage's log) is rewritten after each stage in `--out`, so a run
cut short still reports what finished.

`--dry_run` prints the plan and checks that every file it names exists; `--smoke` runs the
whole plan on the CPU with a few batches per stage (what CI and a GPU-less machine can check).

    python -m fuse_lightning.gpu_check --data_dir data            # on a GPU machine
    python -m fuse_lightning.gpu_check --packed_data PACK         # data carried as JPEG mosaics
    python -m fuse_lightning.gpu_check --data_dir data --dry_run  # the plan, nothing run
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 50_000
# Victim runs: batch 512 with the linear-scaled LR of the 128 / 0.1 recipe halved (0.2): large
# batches keep a GPU busy, and a short schedule wants a moderate peak.
VICTIM_BATCH, VICTIM_LR = 512, 0.2


@dataclass
class Stage:
    """One step of the check: a command, its time limit and where its outputs land."""

    name: str
    cmd: list[str]
    timeout_s: int
    run_dir: str | None = None  # where the stage's metrics.csv / manifest.json land
    result: dict[str, Any] = field(default_factory=dict)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fuse_lightning", *args]


def _logger_into(run_dir: Path) -> list[str]:
    # CSVLogger with empty name/version: metrics.csv goes straight into run_dir.
    return ["--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.logger.init_args.name", "",
            "--trainer.logger.init_args.version", "", "--trainer.default_root_dir", str(run_dir)]


def plan(args: Namespace, work: Path, data_dir: Path, victim_epochs: int) -> list[Stage]:
    """The stages of the check, in order (commands only; nothing runs here)."""
    gpu = ["--config", "configs/trainer/gpu.yaml", "--trainer.devices", "1"]
    limits: list[str] = []
    data: list[str] = ["--data.data_dir", str(data_dir)]
    if args.smoke:  # CPU, a few batches: checks the orchestration, not the numbers
        gpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
        limits = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
        data += ["--data.check_counts", "false"]
    quiet = ["--trainer.enable_progress_bar", "false"]
    fuse_dir = work / "fuse"
    # ProtectOnFitEnd (no out_dir in the config) and ModelCheckpoint (no dirpath) write under the
    # stage's --trainer.default_root_dir.
    protected = fuse_dir / "protected"
    ckpt = fuse_dir / "checkpoints" / "last.ckpt"
    stages = [
        Stage("tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        str(REPO / "tests")], 150),
        Stage("bench", [sys.executable, "-m", "fuse_lightning.bench", "--device", "cpu" if args.smoke else "cuda",
                        "--batch", "512" if not args.smoke else "32", "--json", str(work / "bench.json")]
              + (["--steps", "6"] if args.smoke else ["--steps", str(args.bench_steps), "--precision", "bf16-mixed"]),
              300),
        Stage("fuse", _cli("fit", "--config", "configs/fuse_cifar10.yaml", *gpu, *data, *limits, *quiet,
                           "--trainer.max_epochs", str(args.fuse_epochs),
                           "--trainer.max_time", f"00:00:{args.fuse_seconds // 60:02d}:{args.fuse_seconds % 60:02d}",
                           *_logger_into(fuse_dir)),
              args.fuse_seconds + 180, str(fuse_dir)),
        Stage("protect", _cli("protect", "--ckpt", str(ckpt), "--config", "configs/fuse_cifar10.yaml", *data,
                              "--out", str(work / "protected_cli"), "--overwrite",
                              "--device", "cpu" if args.smoke else "cuda"),
              240, str(work / "protected_cli")),
    ]
    for source in ("clean", "fuse"):
        for filt in ("none", "lowpass-ideal-0.5"):
            run_dir = work / "victims" / f"{source}_{filt}"
            cmd = _cli("fit", "--config", "configs/victim_cifar10.yaml", *gpu, *data, *limits, *quiet,
                       "--model.arch", "resnet18", "--trainer.max_epochs", str(victim_epochs),
                       "--data.batch_size", str(VICTIM_BATCH), "--model.lr", str(VICTIM_LR),
                       "--data.train_filter", filt, *_logger_into(run_dir))
            if source == "fuse":
                cmd += ["--data.protected_dir", str(protected)]
            stages.append(Stage(f"victim_{source}_{filt}", cmd, 60 * args.victim_minutes + 120, str(run_dir)))
    sweep_cmd = _cli("sweep", "configs/sweeps/gpu_check.yaml", "--data_dir", str(data_dir))
    if args.smoke:
        sweep_cmd.append("--dry_run")  # the sweep's victims want a GPU config
    stages.append(Stage("sweep", sweep_cmd, 300, str(work / "sweep_gpu_check")))
    return stages


# ---------------------------------------------------------------------------------- parsing


def metric_columns(path: Path) -> dict[str, list[float]]:
    """Every logged value of every numeric column of a Lightning CSVLogger `metrics.csv`, in order."""
    columns: dict[str, list[float]] = {}
    if not path.is_file():
        return columns
    with path.open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if value not in (None, ""):
                    try:
                        columns.setdefault(key, []).append(float(value))
                    except ValueError:
                        pass
    return columns


def _short(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    return value


def summarise(stage: Stage, work: Path, log_path: Path) -> dict[str, Any]:
    """Figures of a finished stage, read from the files it wrote."""
    out: dict[str, Any] = {}
    if stage.name == "tests" and log_path.is_file():
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        out["pytest"] = lines[-1].strip("= ") if lines else ""
    if stage.name == "bench" and (work / "bench.json").is_file():
        bench = json.loads((work / "bench.json").read_text())
        out.update({f"{k} img/s": round(v.get("img_per_s", v.get("protect_img_per_s", 0)))
                    for k, v in bench["items"].items() if "error" not in v})
        out.update({k: f"{v:+.1%}" if "overhead" in k else f"{v:.1%}" for k, v in bench["ratios"].items()})
    if stage.run_dir is None:
        return out
    run_dir = Path(stage.run_dir)
    columns = metric_columns(run_dir / "metrics.csv")
    last = {k: v[-1] for k, v in columns.items()}
    keep = ("val/acc", "epoch", "train/acc", "train/surrogate_acc", "val/surrogate_clean_acc", "perf/epoch_seconds")
    out.update({k: round(v, 4) for k, v in last.items() if k in keep or k.startswith("val/")})
    if columns.get("perf/train_img_per_s"):
        out["train_img_per_s_best_epoch"] = round(max(columns["perf/train_img_per_s"]))
    manifest = run_dir / "manifest.json"
    if stage.name == "fuse":
        manifest = run_dir / "protected" / "manifest.json"  # ProtectOnFitEnd's <default_root_dir>/protected
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        out["num_images"] = info.get("num_images")
        out["protect_img_per_s"] = info.get("protect_img_per_s")
        out["fidelity"] = _short(info.get("fidelity"))
    results = run_dir / "results"
    if stage.name == "sweep" and (results / "table.md").is_file():
        out["table"] = (results / "table.md").read_text()
    return out


def victim_epochs_from_bench(bench_json: Path, minutes: float, default: int) -> int:
    """Epochs that fit `minutes` of ResNet-18 training at 80 % of the benchmarked Lightning rate.

    80 %, because an epoch also pays for validation and logging, which the benchmark leaves out.
    """
    if not bench_json.is_file():
        return default
    items = json.loads(bench_json.read_text()).get("items", {})
    rate = items.get("victim_lightning", {}).get("img_per_s")
    if not rate:
        return default
    return int(max(2, min(30, 0.8 * rate * minutes * 60 // TRAIN_IMAGES)))


# ---------------------------------------------------------------------------------- running


def run_stage(stage: Stage, work: Path, log_dir: Path) -> None:
    """Run one stage with its time limit; fill `stage.result` (exit code, seconds, figures)."""
    log_path = log_dir / f"{stage.name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    start = time.perf_counter()
    with log_path.open("w") as log:
        log.write(f"$ {shlex.join(stage.cmd)}\n")
        log.flush()
        try:
            rc = subprocess.run(stage.cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env,
                                timeout=stage.timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    stage.result = {"rc": rc, "seconds": round(time.perf_counter() - start, 1)}
    try:
        stage.result.update(summarise(stage, work, log_path))
    except (OSError, ValueError, KeyError) as err:  # a half-written file must not stop the check
        stage.result["parse_error"] = f"{type(err).__name__}: {err}"


def environment() -> dict[str, Any]:
    """What ran the check: host, Python, torch and the accelerator."""
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "host_cpus": os.cpu_count()}
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda)
    return info


def portable(text: str, work: Path, out: Path) -> str:
    """Report text without this machine's paths: `python`, `<work>`, `<out>`, `.` for the repo."""
    for path, name in ((sys.executable, "python"), (str(work), "<work>"), (str(out), "<out>"), (str(REPO), ".")):
        text = text.replace(path, name)
    return text


def write_report(out: Path, env: dict[str, Any], stages: list[Stage], log_dir: Path, notes: list[str]) -> None:
    """Write report.json, report.md and logs.txt into `out` (each via a temporary file)."""
    out.mkdir(parents=True, exist_ok=True)
    work = log_dir.parent
    payload = {"environment": env, "notes": notes,
               "stages": [{**asdict(s), "cmd": shlex.join(s.cmd)} for s in stages]}
    lines = ["# GPU check", "", "Command: `python -m fuse_lightning.gpu_check " + " ".join(sys.argv[1:]) + "`", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines += [f"- {n}" for n in notes] + [""]
    lines += ["| stage | exit | seconds | figures |", "|---|---:|---:|---|"]
    for s in stages:
        if not s.result:
            lines.append(f"| {s.name} | not run | | |")
            continue
        figures = {k: v for k, v in s.result.items() if k not in ("rc", "seconds", "table")}
        lines.append(f"| {s.name} | {s.result['rc']} | {s.result['seconds']} | "
                     + ", ".join(f"{k} {v}" for k, v in figures.items()) + " |")
    for s in stages:
        if s.result.get("table"):
            lines += ["", f"Sweep table ({s.name}):", "", s.result["table"]]
    logs = []
    for s in stages:
        path = log_dir / f"{s.name}.log"
        if path.is_file():
            tail = path.read_text(errors="replace").splitlines()[-40:]
            logs.append(f"===== {s.name} =====\n" + "\n".join(tail))
    for name, text in (("report.json", json.dumps(payload, indent=2, default=str)),
                       ("report.md", "\n".join(lines) + "\n"), ("logs.txt", "\n\n".join(logs) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(portable(text, work, out))
        tmp.replace(out / name)


def prepare_work_dir(work: Path) -> None:
    """Create the work directory with configs/ linked, so shipped relative paths land inside."""
    work.mkdir(parents=True, exist_ok=True)
    link = work / "configs"
    if not link.exists():
        link.symlink_to(REPO / "configs", target_is_directory=True)


def build_parser() -> ArgumentParser:
    """Arguments of the GPU check."""
    parser = ArgumentParser(prog="python -m fuse_lightning.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=str | None, default=None, help="Directory holding cifar-10-batches-py/.")
    parser.add_argument("--packed_data", type=str | None, default=None,
                        help="A pack_cifar directory (JPEG mosaics) to unpack into the work dir.")
    parser.add_argument("--work_dir", type=str, default="outputs/gpu_check", help="Scratch directory of every stage.")
    parser.add_argument("--out", type=str, default="experiments/results/gpu_check", help="Report directory.")
    # 100 steps: a GPU victim step takes ~11 ms, so 20 steps (the bench's CPU-sized default) is too
    # short a window to measure the Lightning overhead.
    parser.add_argument("--bench_steps", type=int, default=100, help="Training steps per bench item on the GPU.")
    parser.add_argument("--fuse_epochs", type=int, default=6, help="FUSE epochs (the stop rule may end earlier).")
    parser.add_argument("--fuse_seconds", type=int, default=90, help="FUSE wall-time cap in seconds (trainer.max_time).")
    parser.add_argument("--victim_minutes", type=float, default=0.5, help="Target training minutes per victim.")
    parser.add_argument("--victim_epochs", type=int | None, default=None,
                        help="Fix the victim epochs (default: from the bench).")
    parser.add_argument("--only", type=str | None, default=None,
                        help="Comma-separated stage names to run (default: all).")
    parser.add_argument("--dry_run", action=ActionYesNo, nargs="?", default=False,
                        help="Print the plan and check its files; run nothing.")
    parser.add_argument("--smoke", action=ActionYesNo, nargs="?", default=False,
                        help="CPU, two batches per stage: check the orchestration.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.data_dir) == bool(args.packed_data):
        build_parser().error("give exactly one of --data_dir or --packed_data")
    work = Path(args.work_dir).resolve()
    out = Path(args.out).resolve()
    data_dir = Path(args.data_dir).resolve() if args.data_dir else work / "data"
    epochs = args.victim_epochs or (1 if args.smoke else 8)
    stages = plan(args, work, data_dir, epochs)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in stages}
        if unknown:
            build_parser().error(f"--only: unknown stage(s) {sorted(unknown)}; stages: {[s.name for s in stages]}")
        stages = [s for s in stages if s.name in wanted]
    if args.dry_run:
        missing = [p for p in ("configs/fuse_cifar10.yaml", "configs/victim_cifar10.yaml", "configs/trainer/gpu.yaml",
                               "configs/sweeps/gpu_check.yaml") if not (REPO / p).is_file()]
        for s in stages:
            print(f"# {s.name} (timeout {s.timeout_s}s)\n{shlex.join(s.cmd)}")
        if missing:
            print(f"error: missing files: {missing}", file=sys.stderr)
            return 1
        if args.packed_data and not (Path(args.packed_data) / "pack.json").is_file():
            print(f"error: --packed_data {args.packed_data}: no pack.json", file=sys.stderr)
            return 1
        return 0

    prepare_work_dir(work)
    log_dir = work / "logs"
    log_dir.mkdir(exist_ok=True)
    notes: list[str] = []
    if args.packed_data:
        from fuse_lightning.data.mosaic import unpack_cifar

        start = time.perf_counter()
        unpack_cifar(args.packed_data, data_dir)
        info = json.loads((Path(args.packed_data) / "pack.json").read_text())
        notes.append(f"CIFAR-10 carried as JPEG mosaics (quality {info['quality']}, 4:4:4; ~47 dB PSNR against "
                     f"the source pickles), unpacked in {time.perf_counter() - start:.0f}s")
    env = environment()
    if not args.smoke and "gpu" not in env:
        print("error: no CUDA device visible; use --smoke for a CPU check of the plan", file=sys.stderr)
        return 2
    for stage in stages:
        if stage.name.startswith("victim_") and args.victim_epochs is None and not args.smoke:
            epochs = victim_epochs_from_bench(work / "bench.json", args.victim_minutes, epochs)
            stage.cmd[stage.cmd.index("--trainer.max_epochs") + 1] = str(epochs)
        print(f"[gpu-check] {stage.name} ...", flush=True)
        run_stage(stage, work, log_dir)
        print(f"[gpu-check] {stage.name}: {stage.result}", flush=True)
        write_report(out, env, stages, log_dir, notes)
    failed = [s.name for s in stages if s.result.get("rc") != 0]
    print(f"[gpu-check] report: {out / 'report.md'}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
