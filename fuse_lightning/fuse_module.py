"""FUSE: a perturbation generator trained against a surrogate classifier (min-min), with Random
Spectral Masking (RSM) and Cross-Band Guidance (CBG).

One training step (manual optimization):

1. `k` surrogate updates on x + delta with delta = eps * tanh(G(x, y)) detached: the surrogate
   learns whatever shortcut delta currently carries.
2. One generator update that makes the surrogate's loss *small* (error-minimizing), with the
   surrogate frozen (eval mode, no weight update):

   L_G = w_full * CE(f(x + delta), y)                              (plain error-minimizing term)
       + [RSM] CE(f(x + M_band(delta)), y)                         (a random annulus removed)
       + [CBG] w_band * (CE(f(x + delta_L), y) + CE(f(x + delta_H), y))
             + w_cons * (KL(sg p_H || p_L) + KL(sg p_L || p_H))    (each band guides the other)
             + w_hf * mean(delta_H^2) / eps^2                      (keep high frequencies small)

With RSM disabled, w_full is forced to 1; with both disabled this is the plain error-minimizing
generator. The paper does not publish its exact losses: these choices and their reasons are in
`docs/method.md`. Options add terms (off by default): a grayscale term (`gray_weight`) and a
penalty on overlapping class codes (`code_overlap_weight`); `augment` shows both players the
victim's augmentation of every input. Every term is logged (`train/loss_*`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from fuse_lightning import spectral
from fuse_lightning.budget import eps_to_unit
from fuse_lightning.codes import class_share, code_rank
from fuse_lightning.colour import gray3, luma_chroma_delta
from fuse_lightning.data.base import random_crop_flip, random_resized_crop_flip
from fuse_lightning.jpeg import diff_jpeg
from fuse_lightning.losses import code_overlap, relative_energy, symmetric_kl_guidance
from fuse_lightning.nets.classifiers import ClassifierName
from fuse_lightning.nets.conditioned import ConditionedGenerator
from fuse_lightning.nets.generators import GeneratorName
from fuse_lightning.nets.normalized import CIFAR10_MEAN, CIFAR10_STD, classifier_with_normalization
from fuse_lightning.nets.schedules import cosine_with_warmup

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]

# Radial bands in which the energy share of delta is logged (normalized radius; sqrt(2) = corner).
LOG_BAND_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0, math.sqrt(2) + 1e-6)


@dataclass
class RSMConfig:
    """Random Spectral Masking: remove a random contiguous band of delta's spectrum.

    Args:
        enabled: Apply RSM in the generator update.
        prob: Probability that a given sample has a band removed (others keep the full delta).
        width_range: Range of the removed annulus' width (normalized radius; 1 = Nyquist).
        start_range: Range of the annulus' inner radius (0 includes the DC component).
        full_weight: Weight of the error-minimizing loss on the unmasked delta (forced to 1 when
            RSM is disabled).
        luminance_prob: Probability that a sample's masked delta is also reduced to its
            luminance (ITU-R 601 luma copied to the three channels): masking along the colour
            axis as well as the frequency axis, so the protection cannot live in chroma alone
            (grayscale conversion and JPEG's chroma subsampling remove chroma). 0 disables.
        mask_surrogate_inputs: Also train the surrogate on masked perturbations (half of each
            batch), so it learns the shortcut's features in every band and in luminance; the
            generator can then only keep its loss low with band-wise effective perturbations.
        apply_to: Where the mask acts: "delta" (the RSM term sees `x + M(delta)`: the clean image
            keeps every band) or "image" (it sees `M(x + delta)`, what a victim trained on
            filtered data sees: the clean image loses the band and turns grey too).
        jpeg_prob: Probability that a sample's masked input is also JPEG-compressed (a
            differentiable JPEG, `jpeg.diff_jpeg`) at a quality drawn from `jpeg_quality_range`:
            JPEG joins the masking family, so the shortcut must survive quantization. 0 disables.
        jpeg_quality_range: Range of the JPEG quality (IJG scale, 1-100) drawn per sample.
        band_edges: Draw the removed band from this fixed partition of the radius axis instead
            of `width_range`/`start_range` (one band per sample, uniformly; e.g. `[0, 0.25,
            0.5, 0.75, 1.5]`: each quarter, the lowest one included, is removed for a quarter
            of the samples). None: a random contiguous band.
        worst_of: Draw this many candidate bands per sample and keep the one whose removal
            leaves the surrogate's loss highest (a no-grad pass per candidate): the RSM term
            then trains on the band delta depends on most. 1: one random band.
    """

    enabled: bool = True
    prob: float = 1.0
    width_range: tuple[float, float] = (0.1, 0.5)
    start_range: tuple[float, float] = (0.0, 1.0)
    full_weight: float = 0.5
    luminance_prob: float = 0.5
    mask_surrogate_inputs: bool = False
    apply_to: Literal["delta", "image"] = "delta"
    jpeg_prob: float = 0.0
    jpeg_quality_range: tuple[float, float] = (10.0, 50.0)
    band_edges: list[float] | None = None
    worst_of: int = 1


@dataclass
class CBGConfig:
    """Cross-Band Guidance: the low and high bands of delta must each drive the surrogate alike.

    Args:
        enabled: Add the CBG terms to the generator loss.
        cutoff: Split radius (ideal low-pass): delta_L keeps r <= cutoff, delta_H the rest.
        band_weight: Weight of the error-minimizing loss on each band alone.
        consistency_weight: Weight of the stop-gradient symmetric KL between the two bands.
        high_energy_weight: Weight of the penalty on delta_H's energy (image fidelity).
        temperature: Softmax temperature of the consistency term.
    """

    enabled: bool = True
    cutoff: float = 0.25
    band_weight: float = 1.0
    consistency_weight: float = 1.0
    high_energy_weight: float = 0.1
    temperature: float = 1.0


class FUSEModule(L.LightningModule):
    """Trains a perturbation generator against a surrogate classifier (error-minimizing, min-min).

    Args:
        num_classes: Number of classes; linked from the DataModule by the CLI.
        image_size: Image height/width; linked from the DataModule.
        mean: Per-channel mean for the surrogate's normalisation; linked from the DataModule.
        std: Per-channel std; linked from the DataModule.
        eps: L-inf budget in 0-255 units (8 means 8/255).
        generator_arch: Generator backbone: `encdec` (fast) or `unet`.
        generator_width: Generator base width.
        label_embed_dim: Label-embedding channels fed to the generator (0: delta = G(x)).
        label_code_size: 0: constant per-class embedding channels; k > 0: a learned k x k spatial
            code per class, resized to the image (see `ConditionedGenerator`).
        output_code_size: 0 disables; k > 0 adds a learned k x k code per class and channel
            (initialised N(0, 1)) to the generator's output before the tanh, so delta starts as
            class-wise random noise and the generator shapes it (see `ConditionedGenerator`).
        output_code_trainable: False keeps the output codes at their random draw (see
            `ConditionedGenerator`).
        surrogate_arch: Surrogate classifier from the registry (e.g. fastnet, resnet18).
        surrogate_kwargs: Extra keyword arguments of the surrogate builder (e.g. `{width: 0.5}`).
        surrogate_steps: Surrogate updates (k) per training step, on the same batch.
        surrogate_optimizer: Optimizer factory for the surrogate (default SGD lr 0.1, momentum
            0.9, weight decay 5e-4, the error-minimizing-noise recipe).
        generator_optimizer: Optimizer factory for the generator (default Adam lr 1e-3).
        scheduler: "none" or "cosine" (both optimizers, stepped by hand every training step).
        generator_grad_clip: Max gradient norm of the generator update (0 disables).
        mode: Export mode: "samplewise" (delta = G(x, y) per image) or "classwise" (one delta per
            class: the class mean of G's outputs).
        stop_accuracy: Stop when the surrogate's epoch accuracy on perturbed training data reaches
            this (as error-minimizing noise does); 1.1 disables.
        min_epochs_before_stop: Never stop before this many epochs.
        rsm: Random Spectral Masking settings.
        cbg: Cross-Band Guidance settings.
        log_spectrum_every_n_steps: How often band energies and PSNR/SSIM of delta are logged.
        luma_share: Fraction of the L-inf budget reserved for a grey (equal-in-every-channel)
            component of delta, which grayscale conversion keeps exactly and JPEG keeps in its
            full-resolution Y channel (`colour.luma_chroma_delta`); 0 is free RGB, 1 a grey delta.
        gray_weight: Weight of a grayscale term in the generator loss, `CE(f(gray(x + delta)), y)`:
            the protected image converted to grayscale (what a grayscale attacker's victim
            trains on) must be a shortcut by itself. 0 disables.
        gray_surrogate_share: Share of each surrogate batch converted to grayscale before the
            surrogate's update. why: a surrogate trained only on colour images learns the
            cheapest code, chroma, and ignores grey patterns, so a grey term alone has nothing
            to push against; a surrogate that also sees grayscale inputs is a proxy for the
            grayscale attacker's victim. 0 disables.
        augment: The victim's training augmentation, applied on the device to every protected
            image the surrogate trains on and every input of the generator's loss terms
            (differentiably, an independent draw per image): "none", "crop_flip" (4-pixel pad +
            crop and flip, the CIFAR victims' recipe) or "resized_crop" (RandomResizedCrop +
            flip, the ImageNet victims' recipe). why: a victim never sees `x + delta` pixel-
            aligned; a shortcut crafted on aligned images may not survive a rescaled crop.
        augment_scale: Area range of "resized_crop" (torchvision's default is (0.08, 1)).
        code_overlap_weight: Weight of `losses.code_overlap` in the generator loss: the mean
            squared cosine between the batch's centred class-mean deltas, which keeps the class
            codes distinct (at 64x64 they were seen to merge into two). 0 disables.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        eps: float = 8.0,
        generator_arch: GeneratorName = "encdec",
        generator_width: int = 32,
        label_embed_dim: int = 8,
        label_code_size: int = 0,
        output_code_size: int = 0,
        output_code_trainable: bool = True,
        surrogate_arch: ClassifierName = "resnet18",
        surrogate_kwargs: dict | None = None,
        surrogate_steps: int = 1,
        surrogate_optimizer: OptimizerFactory | None = None,
        generator_optimizer: OptimizerFactory | None = None,
        scheduler: Literal["none", "cosine"] = "none",
        generator_grad_clip: float = 1.0,
        mode: Literal["samplewise", "classwise"] = "samplewise",
        stop_accuracy: float = 0.99,
        min_epochs_before_stop: int = 1,
        rsm: RSMConfig | None = None,
        cbg: CBGConfig | None = None,
        log_spectrum_every_n_steps: int = 50,
        luma_share: float = 0.0,
        gray_weight: float = 0.0,
        gray_surrogate_share: float = 0.0,
        augment: Literal["none", "crop_flip", "resized_crop"] = "none",
        augment_scale: tuple[float, float] = (0.08, 1.0),
        code_overlap_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in ("samplewise", "classwise"):
            raise ValueError(f"model.mode must be 'samplewise' or 'classwise', got {mode!r}")
        if scheduler not in ("none", "cosine"):
            raise ValueError(f"model.scheduler must be 'none' or 'cosine', got {scheduler!r}")
        if not 0 < eps <= 255:
            raise ValueError(f"model.eps is in 0-255 units and must be in (0, 255], got {eps}")
        if not 0.0 <= luma_share <= 1.0:
            raise ValueError(f"model.luma_share must be in [0, 1], got {luma_share}")
        if gray_weight < 0:
            raise ValueError(f"model.gray_weight must be >= 0, got {gray_weight}")
        if not 0.0 <= gray_surrogate_share <= 1.0:
            raise ValueError(f"model.gray_surrogate_share must be in [0, 1], got {gray_surrogate_share}")
        if augment not in ("none", "crop_flip", "resized_crop"):
            raise ValueError(f"model.augment must be 'none', 'crop_flip' or 'resized_crop', got {augment!r}")
        if not 0 < augment_scale[0] <= augment_scale[1] <= 1:
            raise ValueError(f"model.augment_scale must satisfy 0 < low <= high <= 1, got {augment_scale}")
        if code_overlap_weight < 0:
            raise ValueError(f"model.code_overlap_weight must be >= 0, got {code_overlap_weight}")
        if surrogate_steps < 1:
            raise ValueError(f"model.surrogate_steps must be >= 1, got {surrogate_steps}")
        self.rsm = rsm or RSMConfig()
        self.cbg = cbg or CBGConfig()
        if self.rsm.worst_of < 1:
            raise ValueError(f"model.rsm.worst_of must be >= 1, got {self.rsm.worst_of}")
        if self.rsm.band_edges is not None:
            spectral.sample_partition_band(1, self.rsm.band_edges)  # raises on bad edges, naming them
        self.save_hyperparameters(ignore=["surrogate_optimizer", "generator_optimizer", "rsm", "cbg"])
        self.hparams["rsm"] = asdict(self.rsm)
        self.hparams["cbg"] = asdict(self.cbg)
        self.automatic_optimization = False  # two players, k:1 updates -> manual optimization
        self.eps_unit = eps_to_unit(eps)
        self.surrogate_optimizer_factory = surrogate_optimizer
        self.generator_optimizer_factory = generator_optimizer
        self.generator = ConditionedGenerator(
            generator_arch, num_classes, base_width=generator_width, embed_dim=label_embed_dim,
            code_size=label_code_size, output_code_size=output_code_size,
            output_code_trainable=output_code_trainable,
        )
        self.surrogate = classifier_with_normalization(
            surrogate_arch, num_classes, image_size, mean, std, surrogate_kwargs
        )
        self.surrogate_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_surrogate_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    # ----------------------------------------------------------------- perturbation
    def perturbation(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """delta = eps * tanh(G(x, y)) (split into grey + free RGB by `luma_share`): |delta|_inf <= eps."""
        return luma_chroma_delta(self.generator(x, y), self.eps_unit, self.hparams.luma_share)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Protected images x + delta, clamped to [0, 1]."""
        return (x + self.perturbation(x, y)).clamp(0, 1)

    @torch.no_grad()
    def make_perturb_fn(self, datamodule=None, mode: str | None = None):
        """Make the export's `perturb_fn(images, labels, indices) -> delta` (the function every
        method hands to `protect.protect_dataset`) from the trained generator.

        Class-wise mode first averages G's outputs per class over the DataModule's training set.

        Args:
            datamodule: The DataModule whose training set class-wise mode averages over.
            mode: "samplewise" or "classwise"; default: the module's `mode`.

        Returns:
            The perturbation function (the module is put in eval mode).
        """
        mode = mode or self.hparams.mode
        self.eval()
        if mode == "samplewise":
            return lambda x, y, idx: self.perturbation(x, y)
        if datamodule is None:
            raise ValueError("class-wise export needs the DataModule to average deltas per class")
        datamodule.setup("fit")
        sums = None
        counts = torch.zeros(self.hparams.num_classes, device=self.device)
        for images, labels, _ in datamodule.protect_dataloader():
            x, labels = images.to(self.device).float() / 255, labels.to(self.device)
            delta = self.perturbation(x, labels)
            if sums is None:
                sums = torch.zeros(self.hparams.num_classes, *delta.shape[1:], device=self.device)
            sums.index_add_(0, labels, delta)
            counts += torch.bincount(labels, minlength=self.hparams.num_classes).float()
        class_delta = sums / counts.clamp(min=1).view(-1, 1, 1, 1)
        return lambda x, y, idx: class_delta[y]

    def sample_rsm_bands(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`(start, width)` of one band per sample: from `rsm.band_edges`, else a random contiguous band."""
        if self.rsm.band_edges is not None:
            return spectral.sample_partition_band(n, self.rsm.band_edges, device=device)
        return spectral.sample_band(n, self.rsm.width_range, self.rsm.start_range, device=device)

    @torch.no_grad()
    def worst_bands(self, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Of `rsm.worst_of` candidate bands per sample, the one whose removal from delta leaves
        the surrogate's cross-entropy on `x + M(delta)` highest."""
        n = x.shape[0]
        cands = [self.sample_rsm_bands(n, x.device) for _ in range(self.rsm.worst_of)]

        def masked(start: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
            if self.rsm.apply_to == "image":
                return spectral.remove_band((x + delta).clamp(0, 1), start, width)
            return x + spectral.remove_band(delta, start, width)

        losses = torch.stack([
            F.cross_entropy(self.surrogate(masked(s, w).clamp(0, 1)), y, reduction="none") for s, w in cands
        ])  # (k, n)
        best = losses.argmax(0)
        start = torch.stack([s for s, _ in cands]).gather(0, best[None])[0]
        width = torch.stack([w for _, w in cands]).gather(0, best[None])[0]
        return start, width

    def sample_luma_choice(self, n: int, device: torch.device) -> torch.Tensor:
        """Which of `n` samples RSM also reduces to luminance (`rsm.luminance_prob`), as a bool mask."""
        return torch.rand(n, device=device) < self.rsm.luminance_prob

    def random_spectral_mask(self, delta: torch.Tensor, bands: tuple[torch.Tensor, torch.Tensor] | None = None,
                             to_luma: torch.Tensor | None = None) -> torch.Tensor:
        """RSM: remove one radial band per sample (`bands`, default `sample_rsm_bands`; and, for
        the samples in `to_luma`, default `sample_luma_choice`, keep only the luminance of what
        remains)."""
        n = delta.shape[0]
        start, width = bands if bands is not None else self.sample_rsm_bands(n, delta.device)
        masked = spectral.remove_band(delta, start, width)
        keep = torch.rand(n, device=delta.device) >= self.rsm.prob
        masked = torch.where(keep.view(-1, 1, 1, 1), delta, masked)
        if self.rsm.luminance_prob > 0 and delta.shape[1] == 3:
            to_luma = to_luma if to_luma is not None else self.sample_luma_choice(n, delta.device)
            masked = torch.where(to_luma.view(-1, 1, 1, 1), gray3(masked), masked)
        return masked

    def masked_input(self, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor | None = None,
                     to_luma: torch.Tensor | None = None) -> torch.Tensor:
        """The input of the RSM term: `x + M(delta)` or `M(x + delta)` (`rsm.apply_to`), then
        JPEG-compressed for a random `rsm.jpeg_prob` share of the samples. With `rsm.worst_of`
        > 1 (and labels `y`), M removes the worst of that many candidate bands (`worst_bands`).
        `to_luma`: which samples M also reduces to luminance (default: drawn, `sample_luma_choice`)."""
        bands = self.worst_bands(x, delta.detach(), y) if self.rsm.worst_of > 1 and y is not None else None
        if self.rsm.apply_to == "image":
            out = self.random_spectral_mask((x + delta).clamp(0, 1), bands, to_luma)
        else:
            out = x + self.random_spectral_mask(delta, bands, to_luma)
        if self.rsm.jpeg_prob > 0 and x.shape[1] == 3:
            n = x.shape[0]
            lo, hi = self.rsm.jpeg_quality_range
            quality = torch.empty(n, device=x.device).uniform_(lo, hi).round()
            compressed = diff_jpeg(out.clamp(0, 1), quality)
            use = torch.rand(n, device=x.device) < self.rsm.jpeg_prob
            out = torch.where(use.view(-1, 1, 1, 1), compressed, out)
        return out

    def victim_augment(self, images: torch.Tensor) -> torch.Tensor:
        """The victim's training augmentation (`augment`), an independent draw per image."""
        if self.hparams.augment == "crop_flip":
            return random_crop_flip(images, 4)
        if self.hparams.augment == "resized_crop":
            return random_resized_crop_flip(images, tuple(self.hparams.augment_scale))
        return images

    # ----------------------------------------------------------------- losses
    def generator_losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """All generator loss terms for a batch (surrogate must be frozen by the caller)."""
        delta = self.perturbation(x, y)
        terms: dict[str, torch.Tensor] = {}
        inputs, names = [], []
        full_weight = self.rsm.full_weight if self.rsm.enabled else 1.0
        if full_weight > 0:
            inputs.append(x + delta)
            names.append("em")
        to_luma = None
        if self.rsm.enabled:
            to_luma = self.sample_luma_choice(x.shape[0], x.device)
            inputs.append(self.masked_input(x, delta, y, to_luma))
            names.append("rsm")
        if self.cbg.enabled:
            low, high = spectral.split_bands(delta, self.cbg.cutoff)
            inputs += [x + low, x + high]
            names += ["low", "high"]
            terms["loss_high_energy"] = relative_energy(high, self.eps_unit)
        if self.hparams.gray_weight > 0 and x.shape[1] == 3:
            inputs.append(gray3((x + delta).clamp(0, 1)))
            names.append("gray")
        # One surrogate pass over all variants: cheaper than several small ones.
        logits = self.surrogate(self.victim_augment(torch.cat(inputs).clamp(0, 1))).split(x.shape[0])
        by_name = dict(zip(names, logits, strict=True))
        for name in ("em", "rsm", "low", "high", "gray"):
            if name in by_name:
                terms[f"loss_{name}"] = F.cross_entropy(by_name[name], y)
        if "rsm" in by_name and self.rsm.luminance_prob > 0 and x.shape[1] == 3:
            # Diagnostics, not in the total: the RSM term on the samples reduced to luminance and
            # on the others (which part of the masking family the shortcut does not survive).
            per_sample = F.cross_entropy(by_name["rsm"].detach(), y, reduction="none")
            for name, chosen in (("loss_rsm_luma", to_luma), ("loss_rsm_colour", ~to_luma)):
                if chosen.any():
                    terms[name] = per_sample[chosen].mean()
        if self.cbg.enabled:
            terms["loss_consistency"] = symmetric_kl_guidance(by_name["low"], by_name["high"], self.cbg.temperature)
        total = full_weight * terms.get("loss_em", 0.0) + terms.get("loss_rsm", 0.0)
        if "loss_gray" in terms:
            total = total + self.hparams.gray_weight * terms["loss_gray"]
        if self.hparams.code_overlap_weight > 0:
            terms["loss_code_overlap"] = code_overlap(delta, y)
            total = total + self.hparams.code_overlap_weight * terms["loss_code_overlap"]
        if self.cbg.enabled:
            total = (
                total
                + self.cbg.band_weight * (terms["loss_low"] + terms["loss_high"])
                + self.cbg.consistency_weight * terms["loss_consistency"]
                + self.cbg.high_energy_weight * terms["loss_high_energy"]
            )
        terms["loss_generator"] = total
        terms["delta"] = delta
        return terms

    # ----------------------------------------------------------------- training
    @torch.no_grad()
    def surrogate_inputs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What the surrogate trains on: `x + delta` (detached), clamped to [0, 1]; with
        `rsm.mask_surrogate_inputs` the second half of the batch has masked deltas, with
        `gray_surrogate_share` the last share of the batch is converted to grayscale, and with
        `augment` every image is augmented as the victim's would be."""
        delta = self.perturbation(x, y)
        if self.rsm.enabled and self.rsm.mask_surrogate_inputs:
            # Half the batch sees masked perturbations, so the surrogate also learns the
            # shortcut's features in every band (and in luminance), not only the full delta.
            half = x.shape[0] // 2
            delta = torch.cat([delta[:half], self.random_spectral_mask(delta[half:])])
        protected = (x + delta).clamp(0, 1)
        n_gray = round(self.hparams.gray_surrogate_share * x.shape[0]) if x.shape[1] == 3 else 0
        if n_gray > 0:
            protected = torch.cat([protected[: x.shape[0] - n_gray], gray3(protected[x.shape[0] - n_gray:])])
        return self.victim_augment(protected)

    # ----------------------------------------------------------------- multi-process training
    def _no_ddp_sync(self):
        """Turn off DDP's own gradient reduction for one backward pass.

        why: a FUSE step makes two backward passes (surrogate, then generator) through one DDP
        forward, each using only part of the parameters; DDP's reducer expects one backward that
        uses every parameter and fails (or hangs with `find_unused_parameters`). Gradients are
        averaged explicitly by `_average_gradients` instead.
        """
        model = getattr(getattr(self._trainer, "strategy", None), "model", None) if self._trainer else None
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def _average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """All-reduce (mean) the gradients of `params` across processes; no-op in one process."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        grads = [p.grad for p in params if p.grad is not None]
        if world == 1 or not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)

    def training_step(self, batch, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        opt_f, opt_g = self.optimizers()

        # 1) surrogate: k steps on the current (detached) perturbation
        self.surrogate.train()
        protected = self.surrogate_inputs(x, y)
        for _ in range(self.hparams.surrogate_steps):
            logits = self.surrogate(protected)
            loss_f = F.cross_entropy(logits, y)
            opt_f.zero_grad(set_to_none=True)
            with self._no_ddp_sync():
                self.manual_backward(loss_f)
            self._average_gradients(self.surrogate.parameters())
            opt_f.step()
        self.surrogate_acc(logits.detach(), y)

        # 2) generator: surrogate frozen (eval-mode BN, no grads to its weights)
        self.surrogate.eval()
        self.surrogate.requires_grad_(False)
        terms = self.generator_losses(x, y)
        opt_g.zero_grad(set_to_none=True)
        with self._no_ddp_sync():
            self.manual_backward(terms["loss_generator"])
        self._average_gradients(self.generator.parameters())
        if self.hparams.generator_grad_clip > 0:
            self.clip_gradients(opt_g, gradient_clip_val=self.hparams.generator_grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        self.surrogate.requires_grad_(True)
        self.surrogate.train()
        for scheduler in self._schedulers():
            scheduler.step()

        delta = terms.pop("delta").detach()
        self.log("train/loss_surrogate", loss_f.detach(), prog_bar=True)
        self.log("train/surrogate_acc", self.surrogate_acc, on_step=False, on_epoch=True, prog_bar=True)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss_generator")
        self.log("train/delta_linf_255", delta.abs().amax() * 255)
        if self.hparams.log_spectrum_every_n_steps and batch_idx % self.hparams.log_spectrum_every_n_steps == 0:
            self._log_spectrum_and_fidelity(x, delta)
            # The class code the shortcut is made of: its share of delta and how many distinct
            # codes the batch's classes use (a collapse to ~1 leaves classes inseparable).
            self.log("delta/class_share", class_share(delta, y))
            self.log("delta/code_rank", code_rank(delta, y))

    @torch.no_grad()
    def _log_spectrum_and_fidelity(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        from torchmetrics.functional.image import (
            peak_signal_noise_ratio,
            structural_similarity_index_measure,
        )

        shares = spectral.band_energy(delta.float(), LOG_BAND_EDGES)
        for lo, hi, share in zip(LOG_BAND_EDGES[:-1], LOG_BAND_EDGES[1:], shares, strict=True):
            self.log(f"delta_band/{lo:.2f}-{min(hi, math.sqrt(2)):.2f}", share)
        protected = (x + delta).clamp(0, 1).float()
        self.log("train/psnr", peak_signal_noise_ratio(protected, x.float(), data_range=1.0))
        if min(x.shape[-2:]) >= 11:
            self.log("train/ssim", structural_similarity_index_measure(protected, x.float(), data_range=1.0))

    def _schedulers(self) -> list:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return []
        return schedulers if isinstance(schedulers, list) else [schedulers]

    def on_train_epoch_end(self) -> None:
        acc = self.trainer.callback_metrics.get("train/surrogate_acc")
        if (
            acc is not None
            and float(acc) >= self.hparams.stop_accuracy
            and self.current_epoch + 1 >= self.hparams.min_epochs_before_stop
        ):
            # The error-minimizing stop rule: the surrogate fits the perturbed data, the shortcut is in.
            self.print(f"surrogate accuracy on perturbed data {float(acc):.4f} >= {self.hparams.stop_accuracy}: stopping")
            self.trainer.should_stop = True

    def validation_step(self, batch, batch_idx: int) -> None:
        # Surrogate accuracy on the *clean* test set: low means the shortcut replaced real features.
        x, y = batch[0], batch[1]
        self.val_surrogate_acc(self.surrogate(x), y)
        self.log("val/surrogate_clean_acc", self.val_surrogate_acc, on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        if self.surrogate_optimizer_factory is not None:
            opt_f = self.surrogate_optimizer_factory(self.surrogate.parameters())
        else:
            opt_f = torch.optim.SGD(self.surrogate.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        if self.generator_optimizer_factory is not None:
            opt_g = self.generator_optimizer_factory(self.generator.parameters())
        else:
            opt_g = torch.optim.Adam(self.generator.parameters(), lr=1e-3)
        if self.hparams.scheduler == "none":
            return [opt_f, opt_g]
        # global_step counts every optimizer step (k + 1 per batch); schedule per training batch.
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, cosine_with_warmup(total)) for o in (opt_f, opt_g)]
        return [opt_f, opt_g], schedulers
