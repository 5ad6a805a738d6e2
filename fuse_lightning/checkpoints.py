"""Loading checkpoints without running code from them.

Every checkpoint the project reads goes through `torch.load(..., weights_only=True)`: tensors,
containers and primitives only. The allow-list is extended only with the project's own plain
config types (`SAFE_GLOBALS`), so a crafted checkpoint cannot execute anything when loaded.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "SAFE_GLOBALS", "load_checkpoint", "register_safe_globals"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or holds objects outside the allow-list."""


def _project_types() -> list[type]:
    from fuse_lightning.fuse_module import CBGConfig, RSMConfig

    return [RSMConfig, CBGConfig]


SAFE_GLOBALS: list[type] = []


def register_safe_globals() -> list[type]:
    """Add the project's plain dataclasses to torch's `weights_only` allow-list (idempotent).

    Returns:
        The registered types.
    """
    if not SAFE_GLOBALS:
        SAFE_GLOBALS.extend(_project_types())
        torch.serialization.add_safe_globals(SAFE_GLOBALS)
    return SAFE_GLOBALS


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint with `weights_only=True`.

    Args:
        path: The `.ckpt` file.
        map_location: Passed to `torch.load`.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: The file is missing, unreadable, not a dict, or names a type outside
            the allow-list (the message names the file and the refused type).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    register_safe_globals()
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise CheckpointError(
            f"refusing to load {path}: it holds objects outside the weights-only allow-list "
            f"({detail.strip()}); only load checkpoints written by this project"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (got {type(state).__name__})")
    return state
