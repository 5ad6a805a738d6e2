"""Baseline unlearnable-example methods, each a `Perturbation` exported through `protect_dataset`.

- `RandomNoise`: uniform noise in the budget, the control that should not protect.
- `ErrorMinimizingNoise`: EM, sample-wise or class-wise (Huang et al., ICLR 2021).
- `LinearSeparablePatches`: LSP-style class-wise colour patches (Yu et al., KDD 2022).
- `AutoregressivePerturbation`: AR-style class-wise AR processes (Sandoval-Segura et al., NeurIPS 2022).

Command line: `fuse baseline --config configs/baselines/em_cifar10.yaml --out DIR`.
"""

from fuse_lightning.baselines.base import Perturbation
from fuse_lightning.baselines.em import ErrorMinimizingNoise
from fuse_lightning.baselines.random_noise import RandomNoise
from fuse_lightning.baselines.synthetic import AutoregressivePerturbation, LinearSeparablePatches

__all__ = [
    "AutoregressivePerturbation",
    "ErrorMinimizingNoise",
    "LinearSeparablePatches",
    "Perturbation",
    "RandomNoise",
]
