"""`make gpu-check`: the plan points every stage at the files the earlier stages write."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from fuse_lightning import gpu_check as G


def args(**kw) -> argparse.Namespace:
    defaults = dict(smoke=True, fuse_epochs=1, fuse_seconds=60, victim_minutes=0.5)
    return argparse.Namespace(**{**defaults, **kw})


def value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_plan_reads_the_fuse_export_and_checkpoint_from_the_fuse_run(tmp_path: Path):
    work = tmp_path / "work"
    stages = {s.name: s for s in G.plan(args(), work, tmp_path / "data", 1)}
    fuse = stages["fuse"]
    assert value(fuse.cmd, "--trainer.default_root_dir") == str(work / "fuse") == fuse.run_dir
    # ProtectOnFitEnd has no out_dir in configs/fuse_cifar10.yaml: <default_root_dir>/protected.
    config = yaml.safe_load((G.REPO / "configs" / "fuse_cifar10.yaml").read_text())
    export = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ProtectOnFitEnd"))
    assert "out_dir" not in export.get("init_args", {})
    for name in ("victim_fuse_none", "victim_fuse_lowpass-ideal-0.5"):
        assert value(stages[name].cmd, "--data.protected_dir") == str(work / "fuse" / "protected")
    assert value(stages["protect"].cmd, "--ckpt") == str(work / "fuse" / "checkpoints" / "last.ckpt")


def test_summarise_reads_the_fuse_manifest_from_the_run(tmp_path: Path):
    work = tmp_path / "work"
    fuse = next(s for s in G.plan(args(), work, tmp_path / "data", 1) if s.name == "fuse")
    (work / "fuse" / "protected").mkdir(parents=True)
    (work / "fuse" / "protected" / "manifest.json").write_text(
        json.dumps({"num_images": 50000, "protect_img_per_s": 1234.5, "fidelity": {"psnr": 38.123456}}))
    out = G.summarise(fuse, work, tmp_path / "fuse.log")
    assert out["num_images"] == 50000 and out["protect_img_per_s"] == 1234.5
    assert out["fidelity"] == {"psnr": 38.1235}
