"""Victim training on real data: a small fast net clearly beats chance on clean CIFAR-10."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from fuse_lightning.data import CIFAR10DataModule
from fuse_lightning.nets.schedules import cosine_with_warmup
from fuse_lightning.victim import VictimModule

REAL = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_cosine_schedule_shape():
    f = cosine_with_warmup(100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)


def test_bad_scheduler_is_a_clear_error():
    with pytest.raises(ValueError, match="model.scheduler"):
        VictimModule(arch="fastnet", scheduler="step")


@pytest.mark.slow
@pytest.mark.skipif(not (REAL / "cifar-10-batches-py").is_dir(), reason="real CIFAR-10 not present")
def test_fastnet_beats_chance_on_real_cifar10():
    L.seed_everything(0)
    dm = CIFAR10DataModule(data_dir=str(REAL), train_subset=2000, test_subset=1000, batch_size=64)
    model = VictimModule(arch="fastnet", arch_kwargs={"width": 0.5}, lr=0.05, num_classes=10)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=dm)
    acc = float(trainer.callback_metrics["val/acc"])
    assert acc > 0.25, f"clean accuracy {acc:.3f} should clearly beat chance (0.10)"
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
