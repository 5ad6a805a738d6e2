"""Loss terms of FUSE's generator update, as pure functions of logits and perturbations.

The paper names the ingredients (error-minimizing loss, Random Spectral Masking, Cross-Band
Guidance) but not their exact form; the choices below are documented in `docs/method.md`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
