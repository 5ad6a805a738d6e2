"""Victim training: the classifier an attacker (or an evaluator) trains on a possibly protected set.

The protocol follows the unlearnable-examples literature: train from scratch with SGD (lr 0.1,
momentum 0.9, weight decay 5e-4), a cosine schedule, batch 128, crop + flip augmentation, and
report accuracy on the *clean* test set (`val/acc` during fit, `test/acc` in `test`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from fuse_lightning.nets.classifiers import ClassifierName
from fuse_lightning.nets.normalized import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    classifier_with_normalization,
)
from fuse_lightning.nets.schedules import cosine_with_warmup

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


class VictimModule(L.LightningModule):
    """Trains a classifier from scratch and reports its accuracy on clean test data.

    Args:
        arch: Classifier name from the registry (`fuse_lightning.nets.available_classifiers()`),
            e.g. resnet18 (CIFAR stem on small images), resnet50, vgg16_bn, densenet121,
            mobilenet_v2, wrn16_4, wrn28_10, vit_small, fastnet.
        num_classes: Number of classes; linked from the DataModule by the CLI.
        image_size: Input height/width; linked from the DataModule (stems adapt to it).
        mean: Per-channel mean used to normalise inputs; linked from the DataModule.
        std: Per-channel std used to normalise inputs; linked from the DataModule.
        arch_kwargs: Extra keyword arguments for the classifier builder (e.g. `{width: 0.5}`).
        optimizer: Optimizer factory (`class_path: torch.optim.AdamW` ...). When unset, SGD with
            `lr`, `momentum`, `weight_decay` and `nesterov` below is used.
        lr: Peak learning rate of the default SGD.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        nesterov: Use Nesterov momentum.
        scheduler: "cosine" (per-step cosine decay to zero with optional warm-up) or "none".
        warmup_epochs: Linear warm-up length in epochs (fractions allowed).
        label_smoothing: Cross-entropy label smoothing.
        channels_last: Use the channels-last memory format (10-50 % faster convolutions on CPU
            and on tensor-core GPUs).
        tta_flip: Evaluate (validation, test, predict) on the mean logits of each image and its
            horizontal mirror: about +0.5-1 point for a short schedule, at twice the eval cost.
    """

    def __init__(
        self,
        arch: ClassifierName = "resnet18",
        num_classes: int = 10,
        image_size: int = 32,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        arch_kwargs: dict | None = None,
        optimizer: OptimizerFactory | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        scheduler: Literal["cosine", "none"] = "cosine",
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
        channels_last: bool = True,
        tta_flip: bool = False,
    ) -> None:
        super().__init__()
        if scheduler not in ("cosine", "none"):
            raise ValueError(f"model.scheduler must be 'cosine' or 'none', got {scheduler!r}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.net = classifier_with_normalization(arch, num_classes, image_size, mean, std, arch_kwargs)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and self.logger is not None:
            # Name the attacker's preprocessing in the logs, so every run says what it trained on.
            self.logger.log_hyperparams(
                {
                    "train_filter": getattr(dm, "train_filter_name", "none"),
                    "test_filter": getattr(dm, "test_filter_name", "none"),
                    "protected_dir": str(getattr(dm, "protected_dir", None)),
                }
            )

    def _step(self, batch, metric: MulticlassAccuracy, stage: str) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        logits = self(images)
        if stage != "train" and self.hparams.tta_flip:
            logits = 0.5 * (logits + self(images.flip(-1)))
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        metric(logits, labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "test")
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, self.train_acc, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.test_acc, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        logits = self(batch[0])
        if self.hparams.tta_flip:
            logits = logits + self(batch[0].flip(-1))
        return logits.argmax(dim=1)

    def configure_optimizers(self):
        params = self.parameters()
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        else:
            optimizer = torch.optim.SGD(
                params,
                lr=self.hparams.lr,
                momentum=self.hparams.momentum,
                weight_decay=self.hparams.weight_decay,
                nesterov=self.hparams.nesterov,
            )
        if self.hparams.scheduler == "none":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = int(self.hparams.warmup_epochs * steps_per_epoch)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
