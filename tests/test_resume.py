"""Resume means resume: an interrupted run continues in its own directory and matches an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest

from fuse_lightning.checkpoints import load_checkpoint
from fuse_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]


class CrashAtEpoch(L.Callback):
    """Stands in for kill -9: dies at the start of `epoch`, after the previous epoch's checkpoint."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def victim_args(data: Path, root: Path, *extra: str) -> list[str]:
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]
    return ["fit", "--config", str(REPO / "configs" / "victim_cifar10.yaml"), "--config", str(REPO / "configs" / "victim_cpu.yaml"),
            "--data.data_dir", str(data), "--data.check_counts", "false", "--data.train_subset", "null",
            "--data.test_subset", "null", "--data.batch_size", "64", "--trainer.max_epochs", "3",
            "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks", json.dumps(callbacks), *extra]


def final_state(root: Path) -> dict:
    return load_checkpoint(root / "checkpoints" / "last.ckpt")


def test_interrupted_victim_resumes_to_the_uninterrupted_result(tiny_cifar10: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(victim_args(tiny_cifar10, tmp_path / "straight"))
    crash = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
                        {"class_path": "test_resume.CrashAtEpoch", "init_args": {"epoch": 1}}])
    args = victim_args(tiny_cifar10, tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([*args, "--trainer.callbacks", crash])
    assert final_state(tmp_path / "resumed")["epoch"] == 0
    main([*args, "--ckpt_path", "last"])
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert resumed["epoch"] == straight["epoch"] == 2
    assert resumed["global_step"] == straight["global_step"]
    diffs = [float((a.float() - b.float()).abs().max()) for a, b in
             zip(straight["state_dict"].values(), resumed["state_dict"].values(), strict=True)]
    print(f"max |w_straight - w_resumed| = {max(diffs):.3g}")
    assert max(diffs) <= 1e-5


def test_ckpt_path_last_never_picks_up_another_run(tiny_cifar10: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(victim_args(tiny_cifar10, tmp_path / "run_a", "--trainer.max_epochs", "1"))
    # Another run (other default_root_dir) with --ckpt_path last starts from scratch in its own dir.
    main(victim_args(tiny_cifar10, tmp_path / "run_b", "--trainer.max_epochs", "1", "--ckpt_path", "last"))
    b = final_state(tmp_path / "run_b")
    assert b["epoch"] == 0 and b["global_step"] == load_checkpoint(tmp_path / "run_a" / "checkpoints" / "last.ckpt")["global_step"]
    assert not (tmp_path / "checkpoints").exists()
