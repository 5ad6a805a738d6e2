"""Command-line entry point: `lightning` / `fuse` / `python -m fuse_lightning`.

Lightning subcommands (`fit`, `validate`, `test`, `predict`) come from `LightningCLI`; configs
compose (`--config a.yaml --config b.yaml`, the last wins) and any value can be overridden with a
dotted flag (`--model.init_args.arch resnet18`). Extra project subcommands (`protect`, `sweep`)
are dispatched before Lightning's parser sees the arguments.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fuse_lightning.allocator import keep_freed_memory
from fuse_lightning.checkpoints import register_safe_globals
from fuse_lightning.links import import_config_classes, link_data_to_model

# Short class names (`FUSEModule`, `VictimModule`, `CIFAR10DataModule`, `LowPass`) resolve in
# configs and on the command line.
import_config_classes()


class FuseCLI(LightningCLI):
    """LightningCLI with the data -> model links shared by every module of the project."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        link_data_to_model(parser)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer, with checkpoints in a fixed directory of its run and per-batch seeding."""
        trainer = super().instantiate_trainer(**kwargs)
        fix_checkpoint_dirs(trainer)
        if os.environ.get("PL_GLOBAL_SEED") not in (None, ""):
            trainer.callbacks.append(StepReseed())
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand; a failed run leaves no log directory without results behind."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_empty_log_dir(getattr(self.trainer, "log_dir", None))
            finish_wandb_runs(self.trainer, exit_code=1)
            raise
        finish_wandb_runs(self.trainer, exit_code=0)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Trainer-method kwargs, with checkpoints (`--ckpt_path`) always loaded weights-only."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "ckpt_path" in kwargs or "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
            register_safe_globals()
            kwargs["weights_only"] = True
        return kwargs


def fix_checkpoint_dirs(trainer: L.Trainer) -> list[str]:
    """Give every ModelCheckpoint without a `dirpath` the run's own `<default_root_dir>/checkpoints`.

    Lightning's default puts checkpoints under the logger's new `version_N` directory, so
    `--ckpt_path last` never finds the previous attempt; a directory derived from
    `trainer.default_root_dir` is the same on every attempt of a run and differs between runs.
    `save_last` is switched on where it was left unset, so there is a `last.ckpt` to resume.

    Args:
        trainer: The instantiated trainer.

    Returns:
        The checkpoint directories in use.
    """
    dirs = []
    for callback in trainer.checkpoint_callbacks:
        if callback.dirpath is None:
            callback.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
        if callback.save_last is None:
            callback.save_last = True
        dirs.append(str(callback.dirpath))
    return dirs


class StepReseed(L.Callback):
    """Reseed torch/numpy/random from `(seed, epoch, batch)` before every training batch.

    Augmentation and dropout draws then depend on the position in training alone, so a run
    resumed from a checkpoint continues exactly like an uninterrupted one (the global RNG state
    is not part of a checkpoint).
    """

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        import random

        import numpy as np
        import torch

        base = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        seed = (base * 1_000_003 + trainer.current_epoch * 100_003 + batch_idx) % 2**32
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def finish_wandb_runs(trainer: L.Trainer | None, exit_code: int) -> None:
    """Close the W&B runs of the trainer's loggers once its subcommand is over.

    Lightning leaves them open until the process exits, so a second command in the same process
    (tests, scripts calling `main`) would log into the first one's run. Rank 0 only; no
    collective calls.
    """
    from lightning.pytorch.loggers import WandbLogger

    if trainer is None or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        run = getattr(logger, "_experiment", None) if isinstance(logger, WandbLogger) else None
        if run is not None and hasattr(run, "finish"):
            try:
                run.finish(exit_code=exit_code)
            except Exception as exc:  # noqa: BLE001 - the command's own outcome matters more
                print(f"fuse: warning: closing the W&B run failed ({type(exc).__name__}: {exc})", file=sys.stderr)


# Files a run writes before it has produced anything.
SETUP_ONLY_FILES = frozenset({"config.yaml", "hparams.yaml"})


def remove_empty_log_dir(log_dir: str | None) -> bool:
    """Delete a run's log directory when it holds only setup files (the run failed at the start).

    Args:
        log_dir: The trainer's log directory (may be None or absent).

    Returns:
        Whether it was removed.
    """
    import shutil
    from pathlib import Path

    if not log_dir or not Path(log_dir).is_dir():
        return False
    files = [p for p in Path(log_dir).rglob("*") if p.is_file()]
    if any(p.name not in SETUP_ONLY_FILES for p in files):
        return False
    shutil.rmtree(log_dir, ignore_errors=True)
    return True


def _extra_subcommands() -> dict[str, Callable[[list[str]], int | None]]:
    """Project subcommands beside Lightning's; imported lazily to keep `--help` fast."""
    commands: dict[str, Callable[[list[str]], int | None]] = {}
    try:
        from fuse_lightning.protect import protect_main

        commands["protect"] = protect_main
    except ImportError:  # pragma: no cover - only while the module is absent
        pass
    try:
        from fuse_lightning.sweep import sweep_main

        commands["sweep"] = sweep_main
    except ImportError:  # pragma: no cover
        pass
    try:
        from fuse_lightning.baselines.cli import baseline_main

        commands["baseline"] = baseline_main
    except ImportError:  # pragma: no cover
        pass
    from fuse_lightning.manifest import verify_main

    commands["verify"] = verify_main
    return commands


# Configs interpolate as if each subcommand's config were the root: `${trainer.default_root_dir}`
# (not `${fit.trainer.default_root_dir}`) in a config used by `fit`, `validate` or `test`.
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> FuseCLI:
    """Build (and by default run) the LightningCLI; used by `main` and by the tests."""
    from fuse_lightning.callbacks import LoggedSaveConfigCallback

    return FuseCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # config.yaml in the log directory; with a W&B logger also the run's config and files.
        save_config_callback=LoggedSaveConfigCallback,
        # Re-running a config in the same log directory must not fail on the saved config.
        save_config_kwargs={"overwrite": True},
        # OmegaConf interpolation over the merged config (every --config and dotted flag first):
        # `save_dir: ${trainer.default_root_dir}` follows a `--trainer.default_root_dir` override.
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=list(args) if args is not None else None,
        run=run,
    )


DEBUG_FLAG = "--debug"


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that report a user's mistake (bad path, corrupt file, bad value, unknown name)."""
    from fuse_lightning.checkpoints import CheckpointError
    from fuse_lightning.data.cifar_format import DatasetFormatError
    from fuse_lightning.manifest import ManifestError

    return (DatasetFormatError, ManifestError, CheckpointError, FileNotFoundError, FileExistsError,
            PermissionError, NotADirectoryError, IsADirectoryError, ValueError)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes/contexts, outermost first (cycles cut)."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return chain


def user_error_message(exc: BaseException, max_lines: int = 3) -> str | None:
    """The message to show for a user error, or None when `exc` looks like a bug.

    The project's own error types win (they name the file and the fix); otherwise the deepest
    user-error exception of the chain is used (the original ValueError, not the wrapper of the
    config parser around it).

    Args:
        exc: The exception that ended the command.
        max_lines: Keep at most this many lines of the message.
    """
    chain = _chain(exc)
    project = _user_error_types()[:3]
    picked = next((e for e in chain if isinstance(e, project)), None)
    if picked is None:
        if not isinstance(chain[-1], _user_error_types()):
            return None  # e.g. a TypeError wrapped by the config parser: a bug, keep the traceback
        picked = chain[-1]
    lines = [line for line in str(picked).strip().splitlines() if line.strip()] or [type(picked).__name__]
    return "\n".join(lines[:max_lines])


def main(args: Sequence[str] | None = None) -> int | None:
    """Run the command line: `fit|validate|test|predict|protect|sweep|baseline|verify ...`.

    User errors (missing or corrupt data, values out of range, unknown names) print one short
    `fuse: error:` message and exit with status 1; `--debug` (or FUSE_DEBUG=1) shows the full
    traceback instead. Anything else is a bug and keeps its traceback.
    """
    keep_freed_memory()  # why: see fuse_lightning/allocator.py (CPU steps 1.3-1.9x faster)
    argv = list(sys.argv[1:] if args is None else args)
    debug = DEBUG_FLAG in argv or os.environ.get("FUSE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    if debug:
        return _dispatch(argv, args is None)
    try:
        return _dispatch(argv, args is None)
    except Exception as exc:  # noqa: BLE001 - classified below; bugs are re-raised
        message = user_error_message(exc)
        if message is None:
            raise
        print(f"fuse: error: {message}\n(run with {DEBUG_FLAG} for the full traceback)", file=sys.stderr)
        return 1


def _dispatch(argv: list[str], from_sys_argv: bool) -> int | None:
    """Run a project subcommand or Lightning's CLI."""
    extra = _extra_subcommands()
    if argv and argv[0] in extra:
        return extra[argv[0]](argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(f"Project subcommands besides Lightning's: {', '.join(sorted(extra)) or 'none'}")
    # Without explicit args LightningCLI reads sys.argv itself (and warns when handed a list).
    if from_sys_argv:
        sys.argv = [sys.argv[0], *argv]  # without --debug
    try:
        build_cli(None if from_sys_argv else argv)
    finally:
        end_process_group()
    return 0


def end_process_group() -> None:
    """Destroy the distributed process group a DDP run left behind, if any.

    Why: Lightning keeps the group alive after `fit` returns. Left to the interpreter's exit,
    gloo's worker threads can outlive Python's teardown and the process aborts ("terminate called
    without an active exception", exit -6) after a finished run; PyTorch asks every process to
    call `destroy_process_group()` near the end of main. Local per process, so safe in each rank.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
