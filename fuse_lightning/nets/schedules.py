"""Learning-rate schedules shared by the project's LightningModules (FUSE, victims)."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["cosine_with_warmup"]


def cosine_with_warmup(total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up then cosine decay to zero over `total_steps` optimizer steps."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
