"""The GPU check's plan, parsing and data carrying, checked without a GPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from jsonargparse import Namespace

from fuse_lightning import gpu_check
from fuse_lightning.data.cifar_format import read_cifar
from fuse_lightning.data.mosaic import pack_cifar, tile_mosaic, unpack_cifar, untile_mosaic


def test_tiles_round_trip_exactly():
    images = np.random.default_rng(0).integers(0, 256, (7, 3, 32, 32), dtype=np.uint8)
    mosaic = tile_mosaic(images, columns=3)
    assert mosaic.shape == (3 * 32, 3 * 32, 3)  # 7 tiles -> 3 rows, 2 black tiles at the end
    assert (mosaic[64:, 32:] == 0).all()
    np.testing.assert_array_equal(untile_mosaic(mosaic, 7, 32), images)


def test_pack_unpack_keeps_labels_and_is_near_lossless(tiny_cifar10, tmp_path):
    pack_cifar(tiny_cifar10, tmp_path / "pack", columns=16)
    out = unpack_cifar(tmp_path / "pack", tmp_path / "data")
    assert out.name == "cifar-10-batches-py"
    for split in ("train", "test"):
        a, la = read_cifar(tiny_cifar10, "cifar10", split)
        b, lb = read_cifar(tmp_path / "data", "cifar10", split)
        assert torch.equal(la, lb)
        mse = (a.float() - b.float()).square().mean()
        psnr = 10 * torch.log10(255**2 / mse)
        # the noisy fixture is the hard case for JPEG; real CIFAR-10 measured 46.8 dB
        assert psnr > 35, psnr


def test_unpack_refuses_a_directory_without_pack_json(tmp_path):
    with pytest.raises(ValueError, match="pack.json"):
        unpack_cifar(tmp_path, tmp_path / "data")


def test_dry_run_lists_every_stage(tmp_path, capsys):
    assert gpu_check.main(["--data_dir", str(tmp_path), "--dry_run", "--work_dir", str(tmp_path / "w")]) == 0
    printed = capsys.readouterr().out
    for stage in ("tests", "bench", "fuse", "protect", "victim_clean_none", "victim_fuse_lowpass-ideal-0.5", "sweep"):
        assert f"# {stage} " in printed
    assert "configs/trainer/gpu.yaml" in printed and "--trainer.max_time" in printed
    assert not (tmp_path / "w").exists()  # a dry run writes nothing


def test_bad_arguments_exit_non_zero(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry_run"])  # neither --data_dir nor --packed_data
    with pytest.raises(SystemExit):
        gpu_check.main(["--data_dir", str(tmp_path), "--dry_run", "--only", "nosuchstage"])
    assert gpu_check.main(["--packed_data", str(tmp_path), "--dry_run"]) == 1  # no pack.json


def test_without_a_gpu_the_real_check_refuses(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "environment", lambda: {"torch": "x"})
    assert gpu_check.main(["--data_dir", str(tmp_path), "--work_dir", str(tmp_path / "w"),
                           "--out", str(tmp_path / "o")]) == 2
    assert "--smoke" in capsys.readouterr().err


def test_metrics_and_epochs_are_read_from_files(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,val/acc,perf/train_img_per_s\n0,10,0.5,100\n0,10,,300\n1,20,0.75,200\n")
    columns = gpu_check.metric_columns(tmp_path / "metrics.csv")
    assert columns["val/acc"] == [0.5, 0.75]
    assert columns["perf/train_img_per_s"] == [100, 300, 200]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"items": {"victim_lightning": {"img_per_s": 25_000}}}))
    # 80 % of 25 000 img/s for 30 s = 600 000 images = 12 epochs of 50 000
    assert gpu_check.victim_epochs_from_bench(bench, 0.5, default=8) == 12
    assert gpu_check.victim_epochs_from_bench(tmp_path / "missing.json", 0.5, default=8) == 8


def args(**kw) -> Namespace:
    defaults = dict(smoke=True, fuse_epochs=1, fuse_seconds=60, victim_minutes=0.5)
    return Namespace(**{**defaults, **kw})


def value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_plan_reads_the_fuse_export_and_checkpoint_from_the_fuse_run(tmp_path: Path):
    work = tmp_path / "work"
    stages = {s.name: s for s in gpu_check.plan(args(), work, tmp_path / "data", 1)}
    fuse = stages["fuse"]
    assert value(fuse.cmd, "--trainer.default_root_dir") == str(work / "fuse") == fuse.run_dir
    # ProtectOnFitEnd has no out_dir in configs/fuse_cifar10.yaml: <default_root_dir>/protected.
    config = yaml.safe_load((gpu_check.REPO / "configs" / "fuse_cifar10.yaml").read_text())
    export = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ProtectOnFitEnd"))
    assert "out_dir" not in export.get("init_args", {})
    for name in ("victim_fuse_none", "victim_fuse_lowpass-ideal-0.5"):
        assert value(stages[name].cmd, "--data.protected_dir") == str(work / "fuse" / "protected")
    assert value(stages["protect"].cmd, "--ckpt") == str(work / "fuse" / "checkpoints" / "last.ckpt")


def test_summarise_reads_the_fuse_manifest_from_the_run(tmp_path: Path):
    work = tmp_path / "work"
    fuse = next(s for s in gpu_check.plan(args(), work, tmp_path / "data", 1) if s.name == "fuse")
    (work / "fuse" / "protected").mkdir(parents=True)
    (work / "fuse" / "protected" / "manifest.json").write_text(
        json.dumps({"num_images": 50000, "protect_img_per_s": 1234.5, "fidelity": {"psnr": 38.123456}}))
    out = gpu_check.summarise(fuse, work, tmp_path / "fuse.log")
    assert out["num_images"] == 50000 and out["protect_img_per_s"] == 1234.5
    assert out["fidelity"] == {"psnr": 38.1235}


def test_report_names_no_machine_paths(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    text = f"{gpu_check.sys.executable} -m fuse_lightning fit --data.data_dir {work}/data {gpu_check.REPO}/tests {out}/r"
    assert gpu_check.portable(text, work, out) == "python -m fuse_lightning fit --data.data_dir <work>/data ./tests <out>/r"


def test_bench_items_keep_the_callers_pythonpath(tmp_path, monkeypatch):
    """Bench items run in child processes: packages carried with `pip --target` stay importable."""
    import subprocess
    import sys

    from fuse_lightning import bench

    (tmp_path / "carried_pkg.py").write_text("VALUE = 7\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    path = bench._child_pythonpath()
    assert path.split(os.pathsep)[0] == str(bench.REPO)
    done = subprocess.run([sys.executable, "-c", "import carried_pkg, fuse_lightning; print(carried_pkg.VALUE)"],
                          env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "7"
