"""Loss terms of FUSE's generator update, as pure functions of logits and perturbations.

The paper names the ingredients (error-minimizing loss, Random Spectral Masking, Cross-Band
Guidance) but not their exact form; the choices below are documented in `docs/method.md`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fuse_lightning.codes import class_means


def symmetric_kl_guidance(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-band consistency: each band's prediction is pulled toward the other's (stop-gradient).

    `KL(sg(p_b) || p_a) + KL(sg(p_a) || p_b)`: the gradient of the first term reaches only band a,
    the second only band b, so each band *guides* the other instead of both collapsing to a
    compromise. Softened by `temperature` (T^2 rescales gradients as in distillation).

    Args:
        logits_a: Surrogate logits on x + delta_low.
        logits_b: Surrogate logits on x + delta_high.
        temperature: Softmax temperature.

    Returns:
        Scalar loss (batch mean).
    """
    t = temperature
    log_a = F.log_softmax(logits_a / t, dim=1)
    log_b = F.log_softmax(logits_b / t, dim=1)
    kl_ab = F.kl_div(log_a, log_b.detach(), log_target=True, reduction="batchmean")
    kl_ba = F.kl_div(log_b, log_a.detach(), log_target=True, reduction="batchmean")
    return (kl_ab + kl_ba) * t * t


def relative_energy(part: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean squared amplitude of a perturbation part, relative to the budget (1 = ±eps everywhere)."""
    return part.pow(2).mean() / (eps * eps)


def code_overlap(delta: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between the centred class means of delta in a batch (differentiable).

    why: at 64x64 the label-conditioned generator was seen to merge its class codes into two
    (`codes.code_rank` ~1): a victim can then only separate two groups of classes by the
    shortcut. Penalising the overlap of the class codes keeps them distinct. With C classes of
    equal-norm codes the minimum is 1 / (C - 1)^2 (a regular simplex), reached for C = 2 at 1.

    Args:
        delta: Perturbations (N, ...).
        labels: Class of each perturbation (N,).

    Returns:
        A scalar in [0, 1]; 0 when fewer than two classes are in the batch.
    """
    means = class_means(delta, labels)
    if len(means) < 2:
        return delta.sum() * 0.0
    centred = means - means.mean(0, keepdim=True)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cos = unit @ unit.T
    off = ~torch.eye(len(means), dtype=torch.bool, device=delta.device)
    return cos[off].pow(2).mean()
