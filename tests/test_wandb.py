"""W&B: live logging of FUSE and victim runs, protected sets as artifacts, offline resolution.

Everything runs offline (`WANDB_MODE=offline`, every W&B directory under the test's tmp dir) and is
checked by reading the offline run files (`wandb_records.read_offline_run`, beside these tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fuse_lightning.cli import main
from fuse_lightning.manifest import ManifestError, verify_manifest

wandb = pytest.importorskip("wandb")

from wandb_records import OfflineRun, find_offline_runs, read_offline_run  # noqa: E402

from fuse_lightning.wandb_artifacts import (  # noqa: E402
    ARTIFACT_TYPE,
    fetch_protected_set,
    log_protected_set,
    offline_index_path,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHA256 = set("0123456789abcdef")


def offline_wandb(monkeypatch, root: Path) -> Path:
    """Point every W&B directory (runs, cache, staging, downloads) into `root`, offline."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for var, sub in (("WANDB_DIR", "wandb-runs"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_ARTIFACT_DIR", "wandb-artifacts"),
                     ("WANDB_CONFIG_DIR", "wandb-config")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(root / sub))
    return root


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline W&B in `tmp_path`; W&B's process-wide settings (read once from the environment)
    and service are reset before and after, so each test gets its own directories."""
    wandb.teardown()
    monkeypatch.chdir(tmp_path)
    yield offline_wandb(monkeypatch, tmp_path)
    wandb.teardown()


# Run directories are given as absolute paths: W&B's service resolves a relative `dir` against its
# own working directory, which is the one of the first test that started it.


def tiny_data_args(root: Path) -> list[str]:
    return ["--data.data_dir", str(root), "--data.check_counts", "false", "--data.train_subset", "null",
            "--data.test_subset", "null", "--data.download", "false", "--data.num_workers", "0"]


def read_runs(root: Path) -> list[OfflineRun]:
    """Every offline run under `root`, once W&B has written its end (it writes asynchronously)."""
    runs = [read_offline_run(p, wait_s=60) for p in find_offline_runs(root)]
    assert all(run.finished for run in runs), "W&B did not write the end of a run within 60 s"
    return runs


def only_run(root: Path) -> OfflineRun:
    runs = read_runs(root)
    assert len(runs) == 1, [r.run_file for r in runs]
    return runs[0]


def protected_artifacts(run: OfflineRun):
    return [a for a in run.artifacts if a.type == ARTIFACT_TYPE]


def tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_fuse_fit_logs_losses_images_config_and_artifact(tiny_cifar10, wandb_env, tmp_path):
    """A 2-epoch FUSE fit with logger/wandb.yaml: losses, images, config, one protected-set artifact;
    `fuse protect --wandb_project` logs a second one; both fetch back on a "second machine"."""
    torch.manual_seed(0)
    args = ["fit", "--config", str(CONFIGS / "fuse_cifar10.yaml"), "--config", str(CONFIGS / "fuse_cifar10_cpu.yaml"), "--config", str(CONFIGS / "logger" / "wandb.yaml"),
            *tiny_data_args(tiny_cifar10), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
            "--trainer.default_root_dir", str(tmp_path / "runs" / "fuse"), "--trainer.enable_progress_bar", "false",
            "--model.init_args.log_spectrum_every_n_steps", "1", "--model.init_args.stop_accuracy", "1.1"]
    assert main(args) == 0
    run_dir = tmp_path / "runs" / "fuse"
    run = only_run(run_dir / "wandb")  # WandbLogger's save_dir is the run directory
    assert run.project == "fuse-lightning"

    for key in ("train/loss_generator", "train/loss_em", "train/loss_rsm", "train/loss_low", "train/loss_high",
                "train/loss_consistency", "train/loss_high_energy", "train/loss_surrogate", "train/psnr",
                "train/ssim", "train/surrogate_acc", "val/surrogate_clean_acc"):
        assert run.values(key), f"{key} not in the W&B history"
    assert len(run.values("val/surrogate_clean_acc")) == 2  # one per epoch

    for key in ("media/grid_clean_delta_protected", "media/delta_spectrum"):
        logged = run.values(key)
        assert len(logged) == 2, key  # every epoch
        step, image = logged[-1]
        assert image["_type"] == "images/separated" and image["count"] == 1
        assert (run.files_dir / image["filenames"][0]).is_file()
        assert any("trainer/global_step" in row for row in run.history if key in row)

    assert run.config["model"]["init_args"]["eps"] == 8  # the resolved CLI config
    assert run.config["trainer"]["max_epochs"] == 2
    assert run.config["data"]["class_path"].endswith("CIFAR10DataModule")
    assert "lightning_config.yaml" in run.files
    assert "eps: 8" in (run.files_dir / "lightning_config.yaml").read_text()

    [artifact] = protected_artifacts(run)
    assert artifact.name == "fuse-protected"
    files = artifact.metadata["files"]
    assert files and all(len(d) == 64 and set(d) <= SHA256 for d in files.values())
    assert artifact.metadata["method"] == "fuse" and artifact.metadata["fidelity"]["psnr"] > 0
    assert set(artifact.entries) == {*files, "manifest.json"}
    assert run.summary["protected_set/artifact"] == "fuse-protected:v0"
    assert run.summary["protected_set/psnr"] == pytest.approx(artifact.metadata["fidelity"]["psnr"])

    # `fuse protect` from the checkpoint, logged by its own short run.
    out = tmp_path / "exported"
    assert main(["protect", "--ckpt", str(run_dir / "checkpoints" / "last.ckpt"),
                 "--config", str(CONFIGS / "fuse_cifar10.yaml"), "--config", str(CONFIGS / "fuse_cifar10_cpu.yaml"), *tiny_data_args(tiny_cifar10),
                 "--out", str(out), "--wandb_project", "fuse-test"]) == 0
    [protect_run] = read_runs(tmp_path / "wandb-runs")
    assert protect_run.project == "fuse-test" and protect_run.job_type == "protect"
    [exported] = protected_artifacts(protect_run)
    assert exported.name == "exported" and exported.metadata["checkpoint"]

    # Both resolve offline into other directories, from W&B's records and staged copies.
    fetched = fetch_protected_set("fuse-protected:v0", tmp_path / "machine2" / "fuse", project="fuse-lightning")
    assert tree(fetched) == tree(run_dir / "protected")
    fetched = fetch_protected_set("fuse-test/exported:latest", tmp_path / "machine2" / "exported")
    assert tree(fetched) == tree(out)


def test_victim_fit_logs_val_acc_per_epoch(tiny_cifar10, wandb_env, tmp_path):
    torch.manual_seed(0)
    configs = ["victim_cifar10.yaml", "victim_cpu.yaml", "trainer/cpu.yaml", "logger/wandb.yaml"]
    args = ["fit", *[w for c in configs for w in ("--config", str(CONFIGS / c))], *tiny_data_args(tiny_cifar10),
            "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(tmp_path / "runs" / "victim"),
            "--trainer.enable_progress_bar", "false"]
    assert main(args) == 0
    run = only_run(tmp_path / "runs" / "victim" / "wandb")
    val_acc = run.values("val/acc")
    assert len(val_acc) == 2 and val_acc[0][0] < val_acc[1][0]  # one row per epoch, increasing steps
    epochs = [row["epoch"] for row in run.history if "val/acc" in row]
    assert epochs == [0, 1]
    for key in ("train/loss_step", "train/loss_epoch", "train/acc", "val/loss", "perf/train_img_per_s"):
        assert run.values(key), key
    assert run.config["model"]["init_args"]["arch"] == "fastnet"
    assert run.config["train_filter"] == "none"  # VictimModule's own hyperparameters
    assert run.config["seed_everything"] == 0
    assert not protected_artifacts(run)


def make_protected_set(root: Path, tiny_cifar10: Path, seed: int = 0) -> Path:
    from fuse_lightning.baselines import RandomNoise
    from fuse_lightning.data import CIFAR10DataModule

    dm = CIFAR10DataModule(data_dir=str(tiny_cifar10), check_counts=False, batch_size=64, download=False)
    return RandomNoise(eps=8, seed=seed).protect(dm, root / f"random{seed}", device="cpu", progress=False)


def test_roundtrip_to_a_second_directory_and_corruption(tiny_cifar10, wandb_env, tmp_path):
    source = make_protected_set(tmp_path / "machine1", tiny_cifar10)
    ref = log_protected_set(source, "random-c10", project="fuse-test", aliases=["seed0"])
    assert ref == "random-c10:v0"
    original = tree(source)
    # Logging the same files again keeps the version.
    assert log_protected_set(source, "random-c10", project="fuse-test") == "random-c10:v0"

    first, second = read_runs(tmp_path / "wandb-runs")
    [artifact], [again] = protected_artifacts(first), protected_artifacts(second)
    assert "seed0" in artifact.aliases and artifact.digest == again.digest
    # W&B's staged copies (each log_artifact stages its own), recorded in the runs' files.
    staged = {rel: [Path(a.entries[rel]["local_path"]) for a in (artifact, again)] for rel in artifact.entries}
    assert all(p.is_file() and tmp_path / "wandb-data" in p.parents for copies in staged.values() for p in copies)
    # The offline index holds what the run's artifact record holds: W&B's manifest and the metadata.
    entry = json.loads(offline_index_path().read_text().splitlines()[0])
    assert entry["metadata"] == artifact.metadata and entry["digest"] == artifact.digest
    assert {rel: (e["digest"], e["size"], e["local_path"]) for rel, e in entry["entries"].items()} == {
        rel: (e["digest"], e["size"], e["local_path"]) for rel, e in artifact.entries.items()}

    # The source is gone (another machine would not have it): fetch reads W&B's own copies.
    import shutil

    shutil.rmtree(source)
    for tag in ("random-c10:v0", "random-c10:latest", "random-c10:seed0", "fuse-test/random-c10"):
        dest = tmp_path / "machine2" / tag.replace(":", "_").replace("/", "_")
        assert fetch_protected_set(tag, dest, project="fuse-test") == dest
        assert tree(dest) == original
        verify_manifest(dest)
    assert fetch_protected_set("random-c10:v0", dest, project="fuse-test") == dest  # already there
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        fetch_protected_set("random-c10:v0", tmp_path / "occupied", project="fuse-test")  # something else
    # Other files under the same name: the next version, and `latest` moves to it.
    other = make_protected_set(tmp_path / "machine1", tiny_cifar10, seed=1)
    assert log_protected_set(other, "random-c10", project="fuse-test") == "random-c10:v1"
    assert tree(fetch_protected_set("random-c10", tmp_path / "machine2" / "latest", project="fuse-test")) == tree(other)
    with pytest.raises(FileNotFoundError, match="random-c10:v7"):
        fetch_protected_set("random-c10:v7", tmp_path / "nowhere", project="fuse-test")

    # One flipped byte in W&B's store: the fetch fails naming the file, and leaves nothing behind.
    victim = next(rel for rel in staged if rel != "manifest.json")
    for path in staged[victim]:
        path.chmod(0o644)  # W&B stages read-only copies
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    dest = tmp_path / "machine3"
    with pytest.raises(ManifestError, match=victim.split("/")[-1]):
        fetch_protected_set("random-c10:v0", dest, project="fuse-test")
    assert not dest.exists() and not list(dest.parent.glob(".machine3*"))


def test_fetch_checks_the_sha256_of_the_manifest(tiny_cifar10, wandb_env, tmp_path, monkeypatch):
    """A store whose files agree with W&B's record but not with manifest.json is refused."""
    source = make_protected_set(tmp_path / "machine1", tiny_cifar10)
    manifest = json.loads((source / "manifest.json").read_text())
    victim = sorted(manifest["files"])[0]
    manifest["files"][victim] = "0" * 64  # the set was tampered with before it was logged...
    (source / "manifest.json").write_text(json.dumps(manifest))
    from fuse_lightning import wandb_artifacts

    with monkeypatch.context() as patch:  # ...past the check at logging time
        patch.setattr(wandb_artifacts, "verify_manifest", lambda d: json.loads((Path(d) / "manifest.json").read_text()))
        ref = log_protected_set(source, "tampered", project="fuse-test")
    with pytest.raises(ManifestError, match=victim.split("/")[-1]):
        fetch_protected_set(ref, tmp_path / "machine2", project="fuse-test")
    with pytest.raises(ManifestError, match=victim.split("/")[-1]):
        log_protected_set(source, "tampered", project="fuse-test")  # a damaged set is never logged


def test_baseline_cli_logs_its_export(tiny_cifar10, wandb_env, tmp_path, capsys):
    out = tmp_path / "ar"
    assert main(["baseline", "--data", "CIFAR10DataModule", "--data.init_args.data_dir", str(tiny_cifar10),
                 "--data.init_args.check_counts", "false", "--data.init_args.download", "false",
                 "--method", "AutoregressivePerturbation", "--out", str(out), "--device", "cpu", "--no_progress",
                 "--wandb_project", "fuse-test", "--wandb_artifact", "ar-seed0"]) == 0
    assert "ar-seed0:v0" in capsys.readouterr().out
    [run] = read_runs(tmp_path / "wandb-runs")
    [artifact] = protected_artifacts(run)
    assert artifact.metadata["method"] == "ar"
    assert artifact.metadata["config"]["method"]["class_path"].endswith("AutoregressivePerturbation")
    assert run.config["method"] == "ar"
    index = [json.loads(line) for line in offline_index_path().read_text().splitlines()]
    assert [(e["project"], e["name"], e["version"]) for e in index] == [("fuse-test", "ar-seed0", "v0")]


def test_everything_imports_and_runs_without_wandb(tmp_path):
    """No command needs wandb unless asked to log to it."""
    code = (
        "import sys; sys.modules['wandb'] = None\n"
        "import fuse_lightning.cli, fuse_lightning.callbacks, fuse_lightning.wandb_artifacts as w\n"
        "import fuse_lightning.protect, fuse_lightning.baselines.cli\n"
        "assert w.default_artifact_name('runs/x/protected') == 'x-protected'\n"
        "try:\n    w.log_protected_set('.', 'x')\nexcept ImportError as e:\n    print('ImportError', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pip install wandb" in result.stdout


@pytest.mark.slow
def test_ddp_two_processes_log_one_run(tiny_cifar10, tmp_path):
    """Under DDP only rank 0 logs (config, images, artifact) and nothing waits on the other rank."""
    run_dir = tmp_path / "ddp"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "HOME": str(tmp_path)}
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR"):
        env[var] = str(tmp_path / var.lower())
        Path(env[var]).mkdir()
    cmd = [sys.executable, "-m", "fuse_lightning", "fit", "--config", str(CONFIGS / "fuse_cifar10.yaml"), "--config", str(CONFIGS / "fuse_cifar10_cpu.yaml"),
           "--config", str(CONFIGS / "logger" / "wandb.yaml"), *tiny_data_args(tiny_cifar10),
           "--data.batch_size", "32", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
           "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--trainer.accelerator", "cpu",
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
           "--trainer.default_root_dir", str(run_dir)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run = only_run(run_dir / "wandb")
    assert run.config["trainer"]["strategy"] == "ddp"
    assert run.values("train/loss_generator") and run.values("media/grid_clean_delta_protected")
    [artifact] = protected_artifacts(run)
    assert artifact.metadata["num_images"] == 200


SWEEP = """
name: two-point
results_dir: {root}/results
work_dir: {root}/machine1
victim:
  configs: [configs/victim_cifar10.yaml, configs/victim_cpu.yaml, configs/trainer/cpu.yaml]
  overrides: {{data.init_args.check_counts: false, data.init_args.train_subset: null,
              data.init_args.test_subset: null, data.init_args.batch_size: 64, trainer.max_epochs: 2,
              trainer.log_every_n_steps: 1, trainer.enable_progress_bar: false}}
methods:
  noise:
    command: baseline
    configs: [configs/baselines/random_cifar10.yaml]
    overrides: {{data.init_args.check_counts: false, data.init_args.batch_size: 64}}
grid:
  method: [noise]
  arch: [fastnet]
  filter: [none, lowpass-ideal-0.5]
  seed: [0]
"""


def test_two_point_sweep_offline_logs_live_and_a_second_machine_uses_the_artifact(tiny_cifar10, wandb_env, tmp_path):
    """`fuse sweep --backend wandb` offline, for real (subprocess victims, real artifacts): every
    victim run has a per-epoch `val/acc` history, the protected set is one artifact with its sha256
    in the metadata, and a second machine (another work dir) takes the set from the artifact
    instead of preparing it again."""
    from fuse_lightning.sweep import main as sweep_main
    from fuse_lightning.sweep import spec as S
    from fuse_lightning.sweep import wandb_backend as W

    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.format(root=tmp_path))
    os.chdir(REPO)  # config paths in sweep files are relative to the repository
    assert sweep_main([str(path), "--data_dir", str(tiny_cifar10), "--backend", "wandb"]) == 0

    runs = read_runs(tmp_path)
    victims = [r for r in runs if r.values("val/acc")]
    assert len(victims) == 2
    for run in victims:
        steps = [step for step, _ in run.values("val/acc")]
        assert len(steps) == 2 and steps[0] < steps[1]  # live, one row per epoch
    artifacts = [a for r in runs for a in protected_artifacts(r)]
    assert len(artifacts) == 1
    files = artifacts[0].metadata["files"]
    assert files and all(set(digest) <= SHA256 and len(digest) == 64 for digest in files.values())
    prepared = tmp_path / "machine1" / "methods" / "noise" / "protected"

    # A second machine: its own work dir, the launcher's recorded artifact reference.
    sweep1 = S.load_sweep(path)
    refs = W.recorded_refs(sweep1)
    sweep2 = S.load_sweep(path, ["--work_dir", str(tmp_path / "machine2")])
    run = S.expand_grid(sweep2)[0]
    row = W.trial(sweep2, str(tiny_cifar10), {"method": run.method, "arch": run.arch, "filter": run.filter,
                                             "seed": run.seed, "protected_sets": refs})
    assert "error" not in row, row
    assert not (tmp_path / "machine2" / "methods").exists()  # nothing prepared there
    fetched = W.local_copy(sweep2, refs["noise"])
    assert str(fetched) in row["protected_dir"] or row["protected_dir"].endswith(fetched.name)
    assert tree(fetched) == tree(prepared)
    verify_manifest(fetched)
