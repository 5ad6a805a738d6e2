"""Command-line entry point: `lightning` / `fuse` / `python -m fuse_lightning`.

Lightning subcommands (`fit`, `validate`, `test`, `predict`) come from `LightningCLI`; configs
compose (`--config a.yaml --config b.yaml`, the last wins) and any value can be overridden with a
dotted flag (`--model.init_args.arch resnet18`). Extra project subcommands (`protect`, `sweep`)
are dispatched before Lightning's parser sees the arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported so that short class names (`VictimModule`, `CIFAR10DataModule`, `LowPass`) resolve
# in configs and on the command line.
import fuse_lightning.data  # noqa: F401
import fuse_lightning.filters  # noqa: F401
import fuse_lightning.victim  # noqa: F401
from fuse_lightning.checkpoints import register_safe_globals

# DataModule attributes every LightningModule of this project takes as constructor arguments.
LINKED_DATA_ATTRIBUTES = ("num_classes", "image_size", "mean", "std")


class FuseCLI(LightningCLI):
    """LightningCLI with the data -> model links shared by every module of the project."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED_DATA_ATTRIBUTES:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Trainer-method kwargs, with checkpoints (`--ckpt_path`) always loaded weights-only."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "ckpt_path" in kwargs or "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
            register_safe_globals()
            kwargs["weights_only"] = True
        return kwargs


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


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> FuseCLI:
    """Build (and by default run) the LightningCLI; used by `main` and by the tests."""
    return FuseCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # Re-running a config in the same log directory must not fail on the saved config.
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        run=run,
    )


def main(args: Sequence[str] | None = None) -> int | None:
    """Run the command line: `fit|validate|test|predict|protect|sweep|baseline|verify ...`."""
    argv = list(sys.argv[1:] if args is None else args)
    extra = _extra_subcommands()
    if argv and argv[0] in extra:
        return extra[argv[0]](argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(f"Project subcommands besides Lightning's: {', '.join(sorted(extra)) or 'none'}")
    # Without explicit args LightningCLI reads sys.argv itself (and warns when handed a list).
    build_cli(None if args is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
