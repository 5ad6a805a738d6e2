"""Error-minimizing noise (EM): the min-min bi-level optimisation of Huang et al. (ICLR 2021).

Reference: H. Huang, X. Ma, S. M. Erfani, J. Bailey, Y. Wang, "Unlearnable Examples: Making
Personal Data Unexploitable", ICLR 2021.

A surrogate classifier and the perturbations are optimised *together* so that the perturbed
training data is as easy as possible: alternately train the surrogate a few batches on x + delta,
then update delta by projected signed-gradient descent that *minimises* the cross-entropy,
until the surrogate classifies the perturbed training data almost perfectly. The noise becomes a
shortcut a victim learns instead of the image content.

The rounds are resumable: after each one the noise, the surrogate, its optimiser, the data order
and the RNG states go to a state file (`ErrorMinimizingNoise.state_path`, written atomically), so
the same command rerun after a kill continues after the last finished round and ends with the
same noise as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fuse_lightning.baselines.base import Perturbation, resolve_device, seeded_per_index
from fuse_lightning.data.base import random_crop_flip, random_resized_crop_flip
from fuse_lightning.nets.classifiers import ClassifierName
from fuse_lightning.nets.normalized import classifier_with_normalization

__all__ = ["ClasswiseUpdate", "ErrorMinimizingNoise", "load_state", "pgd_min_classwise", "pgd_min_samplewise", "save_state"]

ClasswiseUpdate = Literal["sample_mean", "summed_gradient"]

# Constructor arguments that do not change the result (a state saved with others still fits).
_STATE_NEUTRAL = ("device", "progress")
# The stop rule bounds the rounds without changing any of them, so a state resumes under another
# budget: a fit that ran out of rounds continues with a larger `max_rounds`.
_STATE_BUDGET = ("max_rounds", "stop_accuracy")


def _rounds_defining(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a saved state must share to be resumed: all but the budget."""
    return {k: v for k, v in settings.items() if k not in _STATE_BUDGET}


def save_state(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a state dict with `torch.save` to a temporary sibling, then rename it into place.

    Args:
        state: Tensors, numbers, strings, lists and dicts only (loadable with weights_only).
        path: Destination.

    Returns:
        The destination; a kill during the write leaves the previous state intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state written by `save_state`, weights-only (no code runs from the file).

    Raises:
        RuntimeError: The file is not a readable weights-only state (message names it).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise RuntimeError(f"{path}: not a readable EM state ({type(exc).__name__}: {exc}); "
                           "delete it to start over") from None


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> str:
    """sha256 of the fit set (images, labels, positions): a state only resumes on the same data."""
    digest = hashlib.sha256()
    for t in (images, labels, indices):
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pgd_min_samplewise(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    delta: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    amp: bool = False,
    clip_last_step: bool = True,
) -> torch.Tensor:
    """Error-minimizing PGD: `steps` signed-gradient *descent* steps on CE(model(x + delta), y).

    Args:
        model: Classifier on images in [0, 1] (its mode is left unchanged).
        x: Clean images in [0, 1] (B, C, H, W).
        y: Labels (B,).
        delta: Starting perturbation (B, C, H, W).
        eps: L-infinity radius in the [0, 1] scale.
        step_size: Step in the [0, 1] scale.
        steps: Number of steps.
        amp: bfloat16 autocast on CUDA.
        clip_last_step: Also clip the last step to the image range. Every earlier step is
            clipped, so each gradient is taken at a valid image; class-wise EM's sample-mean rule
            leaves the last one unclipped, as the original does.

    Returns:
        The new delta, detached, with |delta| <= eps and (with `clip_last_step`) x + delta in [0, 1].
    """
    delta = delta.detach()
    for step in range(steps):
        delta.requires_grad_(True)
        with _autocast(x.device, amp):
            loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() - step_size * grad.sign()).clamp(-eps, eps)
        if clip_last_step or step < steps - 1:
            delta = (x + delta).clamp(0.0, 1.0) - x
    return delta.detach()


def pgd_min_classwise(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    class_delta: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    amp: bool = False,
    update: ClasswiseUpdate = "sample_mean",
) -> torch.Tensor:
    """Class-wise error-minimizing PGD: one perturbation per class, shared by its samples.

    Two update rules (classes absent from the batch stay put under both):

    - ``sample_mean`` (the original implementation's rule): every sample starts from its class's
      perturbation and takes its own `steps` signed-gradient steps (clipped to the eps-ball and
      the image range); the class's perturbation becomes the mean of its samples' results. Where
      the samples of a class disagree on a pixel's direction their steps cancel, so the
      perturbation moves only where the class agrees.
    - ``summed_gradient``: `steps` signed steps along the gradient summed over the class's
      samples; every pixel moves a full step each batch, so the perturbation saturates at +-eps
      in a sign pattern.

    Args:
        model: Classifier on images in [0, 1].
        x: Clean images in [0, 1] (B, C, H, W).
        y: Labels (B,).
        class_delta: Perturbation per class (K, C, H, W).
        eps: L-infinity radius in the [0, 1] scale.
        step_size: Step in the [0, 1] scale.
        steps: Number of steps.
        amp: bfloat16 autocast on CUDA.
        update: ``sample_mean`` or ``summed_gradient``.

    Returns:
        The new class perturbations (K, C, H, W), detached, |delta| <= eps.
    """
    class_delta = class_delta.detach()
    if update == "summed_gradient":
        for _ in range(steps):
            class_delta.requires_grad_(True)
            with _autocast(x.device, amp):
                loss = F.cross_entropy(model((x + class_delta[y]).clamp(0.0, 1.0)), y)
            (grad,) = torch.autograd.grad(loss, class_delta)
            class_delta = (class_delta.detach() - step_size * grad.sign()).clamp(-eps, eps)
        return class_delta.detach()
    if update != "sample_mean":
        raise ValueError(f"update must be 'sample_mean' or 'summed_gradient', got {update!r}")
    start = (x + class_delta[y]).clamp(0.0, 1.0) - x
    delta = pgd_min_samplewise(model, x, y, start, eps, step_size, steps, amp, clip_last_step=False)
    sums = torch.zeros_like(class_delta).index_add_(0, y, delta.to(class_delta.dtype))
    counts = torch.bincount(y, minlength=len(class_delta))
    present = counts > 0
    out = class_delta.clone()
    out[present] = sums[present] / counts[present].view(-1, 1, 1, 1).to(sums.dtype)
    return out.clamp(-eps, eps)


class ErrorMinimizingNoise(Perturbation):
    """Unlearnable examples by error-minimizing noise (Huang et al., ICLR 2021), sample- or class-wise.

    Repeat: train the surrogate `train_steps` batches on x + delta; for every training batch run
    `pgd_steps` signed-gradient steps *minimising* the cross-entropy, projected onto |delta| <=
    eps and the image range; stop when the surrogate (eval mode) classifies the perturbed
    training data with accuracy >= `stop_accuracy`, or after `max_rounds`. Class-wise mode keeps
    one delta per class, updated by `classwise_update` (`pgd_min_classwise`).

    Spectrum: sample-wise EM noise is dominated by high spatial frequencies (pixel-level,
    sign-gradient texture), which is why low-pass filtering of the training images weakens it.

    Images outside the fit set (when the DataModule has `train_subset`) get, in sample-wise
    mode, either error-minimizing noise computed against the final surrogate (`unseen="pgd"`)
    or no perturbation (`unseen="zero"`).

    Args:
        eps: L-infinity budget in 0-255 units.
        mode: "samplewise" (one delta per image) or "classwise" (one delta per class).
        arch: Surrogate architecture from the classifier registry (e.g. resnet18, fastnet).
        arch_kwargs: Extra arguments of the classifier builder (e.g. `{width: 0.5}`).
        pgd_steps: PGD steps per batch and round.
        pgd_step_size: PGD step in 0-255 units (0.8 means 0.8/255).
        train_steps: Surrogate training batches per round.
        stop_accuracy: Stop once the surrogate's accuracy on the perturbed training data
            reaches this value (the original: 0.99 sample-wise, 0.9 class-wise).
        max_rounds: Upper bound on the number of rounds.
        lr: Surrogate SGD learning rate.
        momentum: Surrogate SGD momentum.
        weight_decay: Surrogate SGD weight decay.
        batch_size: Batch size of surrogate training and of the PGD passes.
        grad_clip: Clip the surrogate's gradient norm to this value (the original trainer: 5);
            None does not clip.
        classwise_update: Class-wise rule, "sample_mean" (the original implementation: the
            mean of the class's per-sample steps) or "summed_gradient" (one step along the
            class's summed gradient); see `pgd_min_classwise`. Ignored sample-wise.
        augment: Augmentation of the surrogate's training batches (the original trains without):
            False; "crop_flip" (or True: 4-pixel padded random crop + flip, the CIFAR victim's);
            "resized_crop_flip" (RandomResizedCrop's distribution + flip, the ImageNet victim's).
        augment_noise: Also augment inside every PGD step, a fresh draw per step (expectation
            over transformation): the noise then minimises the loss on augmented views, as a
            victim with that augmentation sees them. Needs `augment`.
        unseen: "pgd" or "zero": sample-wise perturbation of images not in the fit set.
        amp: bfloat16 autocast on CUDA (ignored on CPU).
        device: Where the optimisation runs: "auto" (CUDA if available), "cpu", "cuda:0", ...
        progress: Show progress bars.
        seed: Seed of the surrogate's initialisation, the data order and the initial noise.
    """

    def __init__(
        self,
        eps: float = 8.0,
        mode: Literal["samplewise", "classwise"] = "samplewise",
        arch: ClassifierName = "resnet18",
        arch_kwargs: dict | None = None,
        pgd_steps: int = 20,
        pgd_step_size: float = 0.8,
        train_steps: int = 10,
        stop_accuracy: float = 0.99,
        max_rounds: int = 20,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 128,
        grad_clip: float | None = None,
        classwise_update: ClasswiseUpdate = "sample_mean",
        augment: bool | Literal["crop_flip", "resized_crop_flip"] = False,
        augment_noise: bool = False,
        unseen: Literal["pgd", "zero"] = "pgd",
        amp: bool = True,
        device: str = "auto",
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(eps=eps, seed=seed)
        if mode not in ("samplewise", "classwise"):
            raise ValueError(f"mode must be 'samplewise' or 'classwise', got {mode!r}")
        if unseen not in ("pgd", "zero"):
            raise ValueError(f"unseen must be 'pgd' or 'zero', got {unseen!r}")
        if classwise_update not in ("sample_mean", "summed_gradient"):
            raise ValueError(
                f"classwise_update must be 'sample_mean' or 'summed_gradient', got {classwise_update!r}"
            )
        if augment not in (False, True, "crop_flip", "resized_crop_flip"):
            raise ValueError(f"augment must be false, true, 'crop_flip' or 'resized_crop_flip', got {augment!r}")
        if augment_noise and not augment:
            raise ValueError("augment_noise needs augment ('crop_flip' or 'resized_crop_flip')")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or null, got {grad_clip}")
        if pgd_steps < 1 or train_steps < 0 or max_rounds < 1 or batch_size < 1:
            raise ValueError("pgd_steps, max_rounds and batch_size must be >= 1, train_steps >= 0")
        self.mode = mode
        self.arch = arch
        self.arch_kwargs = arch_kwargs
        self.pgd_steps = pgd_steps
        self.pgd_step_size = pgd_step_size
        self.train_steps = train_steps
        self.stop_accuracy = stop_accuracy
        self.max_rounds = max_rounds
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.grad_clip = grad_clip
        self.classwise_update = classwise_update
        self.augment = augment
        self.augment_noise = augment_noise
        self.unseen = unseen
        self.amp = amp
        self.device = device
        self.progress = progress
        self.surrogate: nn.Module | None = None
        self.delta: torch.Tensor | None = None  # (N_fit, C, H, W) or (K, C, H, W)
        self._position: torch.Tensor | None = None  # full-set index -> row of `delta`, -1 if unseen

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"em_{self.mode}"

    # ------------------------------------------------------------------ helpers
    def _augmented(self, x: torch.Tensor) -> torch.Tensor:
        """`x` under this instance's augmentation (unchanged without one); differentiable."""
        if self.augment == "resized_crop_flip":
            return random_resized_crop_flip(x)
        if self.augment:  # True or "crop_flip"
            return random_crop_flip(x, 4)
        return x

    def _perturbed(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        d = self.delta[y] if self.mode == "classwise" else self.delta[rows]
        return (x + d).clamp(0.0, 1.0)

    @torch.no_grad()
    def _evaluate(self, images: torch.Tensor, labels: torch.Tensor, perturbed: bool) -> tuple[float, float]:
        """(accuracy, mean CE) of the surrogate in eval mode on the fit set, clean or perturbed."""
        model, dev = self.surrogate, self.delta.device
        model.eval()
        correct, loss_sum = 0, 0.0
        for start in range(0, len(labels), self.batch_size * 4):
            rows = torch.arange(start, min(start + self.batch_size * 4, len(labels)), device=dev)
            x = images[rows].float() / 255
            y = labels[rows]
            if perturbed:
                x = self._perturbed(x, y, rows)
            with _autocast(dev, self.amp):
                logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        return correct / len(labels), loss_sum / len(labels)

    def evaluate_surrogate(self) -> dict[str, float]:
        """Surrogate accuracy and loss on the fit set, clean and perturbed (after `fit`)."""
        if self.surrogate is None:
            raise RuntimeError("call fit() first")
        acc_c, loss_c = self._evaluate(self._images, self._labels, perturbed=False)
        acc_p, loss_p = self._evaluate(self._images, self._labels, perturbed=True)
        return {"clean_acc": acc_c, "clean_loss": loss_c, "perturbed_acc": acc_p, "perturbed_loss": loss_p}

    def _initial_delta(
        self, images: torch.Tensor, indices: torch.Tensor, num_classes: int, eps: float, gen: torch.Generator
    ) -> torch.Tensor:
        """Uniform start in the eps-ball (as in the original implementation), inside [0, 1]."""
        shape = tuple(images.shape[1:])
        if self.mode == "classwise":
            u = torch.rand((num_classes, *shape), generator=gen)
        else:
            u = seeded_per_index(self.seed, indices, shape, "uniform")
        delta = ((2 * u - 1) * eps).to(images.device)
        if self.mode == "samplewise":
            x0 = images.float() / 255
            delta = (x0 + delta).clamp(0, 1) - x0
        return delta

    def _train_surrogate(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
        order: torch.Tensor, cursor: int, gen: torch.Generator,
    ) -> tuple[float, torch.Tensor, int]:
        """`train_steps` SGD steps on the perturbed fit set; returns (mean loss, order, cursor)."""
        n, dev = len(labels), images.device
        model.train()
        train_loss = 0.0
        for _ in range(self.train_steps):
            if cursor + self.batch_size > n and cursor > 0:
                order, cursor = torch.randperm(n, generator=gen), 0
            rows = order[cursor : cursor + self.batch_size].to(dev)
            cursor += self.batch_size
            x = self._perturbed(images[rows].float() / 255, labels[rows], rows)
            x = self._augmented(x)
            with _autocast(dev, self.amp):
                loss = F.cross_entropy(model(x).float(), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            optimizer.step()
            train_loss += loss.item() / max(1, self.train_steps)
        return train_loss, order, cursor

    def _update_perturbations(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float, round_: int
    ) -> None:
        """One PGD pass over the whole fit set with the surrogate frozen (eval mode)."""
        n, dev = len(labels), images.device
        model.eval()
        model.requires_grad_(False)
        # With augment_noise every PGD step sees a freshly augmented view (the PGD functions call
        # the model once per step), so the noise must survive the victim's augmentation.
        target = (lambda z: model(self._augmented(z))) if self.augment_noise else model
        bar = tqdm(range(0, n, self.batch_size), desc=f"EM round {round_}: PGD", disable=not self.progress, leave=False)
        for start in bar:
            rows = torch.arange(start, min(start + self.batch_size, n), device=dev)
            x, y = images[rows].float() / 255, labels[rows]
            if self.mode == "classwise":
                self.delta = pgd_min_classwise(
                    target, x, y, self.delta, eps, step, self.pgd_steps, self.amp, self.classwise_update
                )
            else:
                self.delta[rows] = pgd_min_samplewise(target, x, y, self.delta[rows], eps, step, self.pgd_steps, self.amp)
        model.requires_grad_(True)

    # ------------------------------------------------------------------ fit
    def fit(self, datamodule) -> None:
        """Run the min-min optimisation on the DataModule's (subset of the) training set."""
        dev = resolve_device(self.device)
        datamodule.setup("fit")
        batches = list(datamodule.protect_dataloader(batch_size=1024, use_subset=True))
        images = torch.cat([b[0] for b in batches]).to(dev)
        labels = torch.cat([b[1] for b in batches]).to(dev)
        indices = torch.cat([b[2] for b in batches]).long()
        n = len(labels)
        eps, step = self.eps / 255, self.pgd_step_size / 255
        self._images, self._labels = images, labels
        self._position = torch.full((int(indices.max()) + 1,), -1, dtype=torch.long)
        self._position[indices] = torch.arange(n)

        cuda_devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(self.seed)
            model = classifier_with_normalization(
                self.arch, datamodule.num_classes, datamodule.image_size,
                datamodule.mean, datamodule.std, self.arch_kwargs,
            ).to(dev)
            if dev.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            self.surrogate = model
            gen = torch.Generator().manual_seed(self.seed)
            self.delta = self._initial_delta(images, indices, datamodule.num_classes, eps, gen)
            optimizer = torch.optim.SGD(
                model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
            history: list[dict[str, float]] = []
            order, cursor = torch.randperm(n, generator=gen), 0
            fingerprint = data_fingerprint(images, labels, indices) if self.state_file else ""
            resumed = self._resume(fingerprint, model, optimizer, gen, dev)
            if resumed is not None:
                history, order, cursor = resumed
            resumed_after = len(history)
            done = bool(history and history[-1]["perturbed_acc"] >= self.stop_accuracy)
            rounds = tqdm(
                total=self.max_rounds, initial=len(history), desc=f"{self.name} rounds",
                unit="round", disable=not self.progress, dynamic_ncols=True,
            )
            for round_ in range(len(history) + 1, self.max_rounds + 1):
                if done:
                    break
                # 1) train the surrogate a few batches on the current perturbed data
                train_loss, order, cursor = self._train_surrogate(model, optimizer, images, labels, order, cursor, gen)
                # 2) update the perturbations over the whole fit set (surrogate frozen, eval mode)
                self._update_perturbations(model, images, labels, eps, step, round_)
                # 3) stop condition: the surrogate fits the perturbed data
                acc, loss_p = self._evaluate(images, labels, perturbed=True)
                history.append(
                    {"round": round_, "train_loss": train_loss, "perturbed_acc": acc, "perturbed_loss": loss_p}
                )
                done = acc >= self.stop_accuracy
                if self.state_file is not None:
                    save_state(self._state(fingerprint, model, optimizer, gen, dev, history, order, cursor),
                               self.state_file)
                rounds.update(1)
                rounds.set_postfix(acc=f"{acc:.4f}", loss=f"{loss_p:.4f}")
                tqdm.write(
                    f"[{self.name}] round {round_}/{self.max_rounds}: surrogate train loss "
                    f"{train_loss:.4f}, accuracy on perturbed training data {acc:.4f} "
                    f"(loss {loss_p:.4f})" + (f"; state saved to {self.state_file}" if self.state_file else ""),
                )
                self._on_round_end(round_, history[-1])
            rounds.close()
        model.eval()
        self.fit_info = {
            "rounds": len(history),
            "converged": bool(history and history[-1]["perturbed_acc"] >= self.stop_accuracy),
            "fit_images": n,
            "resumed_after_round": resumed_after,
            "history": history,
        }

    # ------------------------------------------------------------------ resumable state
    def state_path(self, out_dir: str | os.PathLike, state_dir: str | os.PathLike | None = None) -> Path:
        """`<out_dir>.em-state.pt`, or `<state_dir>/<out_dir name>.em-state.pt`.

        Args:
            out_dir: The export destination.
            state_dir: Directory for the state file (default: the parent of `out_dir`).

        Returns:
            The state file of an export to `out_dir`.
        """
        out_dir = Path(out_dir)
        return Path(state_dir if state_dir is not None else out_dir.parent) / f"{out_dir.name}.em-state.pt"

    def _settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.config().items() if k not in _STATE_NEUTRAL}

    def _state(self, fingerprint, model, optimizer, gen, dev, history, order, cursor) -> dict[str, Any]:
        """Everything the next round depends on, as weights-only-loadable data."""
        return {
            "settings": self._settings(),
            "data": fingerprint,
            "round": len(history),
            "history": history,
            "delta": self.delta.detach().cpu(),
            "surrogate": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "order": order.cpu(),
            "cursor": cursor,
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
        }

    def _resume(self, fingerprint, model, optimizer, gen, dev):
        """Load `self.state_file` into the surrogate, optimiser, noise and RNGs.

        Returns:
            (history, order, cursor) of the saved state, or None when there is no state file
            or it belongs to other settings or data (then the run starts from round 1 and the
            file is overwritten after it). The stop rule's `max_rounds` and `stop_accuracy` may
            differ: they bound the rounds without changing them.
        """
        if self.state_file is None or not Path(self.state_file).is_file():
            return None
        state = load_state(self.state_file)
        if _rounds_defining(state.get("settings") or {}) != _rounds_defining(self._settings()) \
                or state.get("data") != fingerprint:
            tqdm.write(f"[{self.name}] {self.state_file} was saved with other settings or data; starting over")
            return None
        model.load_state_dict(state["surrogate"])
        optimizer.load_state_dict(state["optimizer"])
        self.delta = state["delta"].to(dev)
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if dev.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], dev)
        history = [dict(h) for h in state["history"]]
        tqdm.write(f"[{self.name}] resuming from {self.state_file} after round {state['round']}")
        return history, state["order"], int(state["cursor"])

    def keep_state(self) -> bool:
        """Keep the state when the fit ended on `max_rounds` short of its stop rule: a rerun with
        a larger `max_rounds` then continues the fit instead of starting it over."""
        return not self.fit_info.get("converged", True)

    def _on_round_end(self, round_: int, record: dict[str, float]) -> None:
        """Called after each round's state is saved (a hook for tests and subclasses)."""

    # ------------------------------------------------------------------ perturb
    def perturb_fn(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        if self.delta is None:
            raise RuntimeError("ErrorMinimizingNoise.perturb_fn needs fit() first")
        dev = self.delta.device
        labels_d = labels.to(dev)
        if self.mode == "classwise":
            return self.delta[labels_d].to(device=images.device, dtype=images.dtype)
        idx = indices.cpu().long()
        rows = torch.full_like(idx, -1)
        known = idx < len(self._position)
        rows[known] = self._position[idx[known]]
        seen = rows >= 0
        out = torch.zeros(images.shape, device=dev, dtype=torch.float32)
        if seen.any():
            out[seen.to(dev)] = self.delta[rows[seen].to(dev)]
        if (~seen).any() and self.unseen == "pgd":
            miss = (~seen).to(dev)
            x = images.to(dev, torch.float32)[miss]
            eps = self.eps / 255
            start = (2 * seeded_per_index(self.seed, idx[~seen], tuple(x.shape[1:])) - 1) * eps
            start = (x + start.to(dev)).clamp(0, 1) - x
            self.surrogate.eval()
            self.surrogate.requires_grad_(False)
            with torch.enable_grad():  # protect_dataset runs under no_grad
                out[miss] = pgd_min_samplewise(
                    self.surrogate, x, labels_d[miss], start, eps,
                    self.pgd_step_size / 255, self.pgd_steps, self.amp,
                )
            self.surrogate.requires_grad_(True)
        return out.to(device=images.device, dtype=images.dtype)
