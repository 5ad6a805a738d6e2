"""Resume means resume: an interrupted run continues in its own directory and matches an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

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


class AccuracyPeaksFirst(L.Callback):
    """Makes `val/acc` fall after epoch 0, as on protected data, before any ModelCheckpoint reads it
    (Lightning runs checkpoint callbacks after the others)."""

    def on_validation_end(self, trainer, pl_module):
        trainer.callback_metrics["val/acc"] = torch.tensor(0.5 - 0.1 * trainer.current_epoch)


def victim_args(data: Path, root: Path, *extra: str, shipped_callbacks: bool = False) -> list[str]:
    """A tiny victim; its callbacks are one unmonitored ModelCheckpoint unless `shipped_callbacks`."""
    common = ["fit", "--config", str(REPO / "configs" / "victim_cifar10.yaml"), "--config", str(REPO / "configs" / "victim_cpu.yaml"),
              "--data.data_dir", str(data), "--data.check_counts", "false", "--data.train_subset", "null",
              "--data.test_subset", "null", "--data.batch_size", "64", "--trainer.max_epochs", "3",
              "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
    if shipped_callbacks:  # the config's own, LearningRateMonitor included, which needs a logger
        return [*common, *extra]
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]
    return [*common, "--trainer.logger", "false", "--trainer.callbacks", json.dumps(callbacks), *extra]


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


def test_a_victim_killed_after_its_best_epoch_resumes_from_its_last_epoch(tiny_cifar10: Path, tmp_path: Path, monkeypatch):
    # With the shipped victim config: its accuracy peaks at epoch 0 and the run dies at the start
    # of epoch 2. last.ckpt must hold epoch 1, not the best epoch 0, or a resume repeats epoch 1.
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "victim"
    args = victim_args(tiny_cifar10, root, "--trainer.callbacks+=test_resume.AccuracyPeaksFirst", shipped_callbacks=True)
    crash = json.dumps({"class_path": "test_resume.CrashAtEpoch", "init_args": {"epoch": 2}})
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([*args, f"--trainer.callbacks+={crash}"])
    killed = final_state(root)
    assert killed["epoch"] == 1
    main([*args, "--ckpt_path", "last"])
    final = final_state(root)
    assert final["epoch"] == 2
    assert final["global_step"] * 2 == killed["global_step"] * 3  # all 3 epochs' steps, as uninterrupted
