"""What the training CLI (`fuse_lightning.cli`) and `fuse protect` share: the names configs may use
and the DataModule attributes that every model of the project takes from its DataModule."""

from __future__ import annotations

from typing import Any

# DataModule attributes every LightningModule of the project takes as constructor arguments.
LINKED_DATA_ATTRIBUTES = ("num_classes", "image_size", "mean", "std")


def import_config_classes() -> None:
    """Import the modules whose classes configs name, so that short class names
    (`FUSEModule`, `VictimModule`, `CIFAR10DataModule`, `LowPass`) resolve."""
    import fuse_lightning.data  # noqa: F401
    import fuse_lightning.filters  # noqa: F401
    import fuse_lightning.fuse_module  # noqa: F401
    import fuse_lightning.victim  # noqa: F401


def link_data_to_model(parser: Any, model_key: str = "model.init_args") -> None:
    """Link `data.<attribute>` to `<model_key>.<attribute>` (on instantiation) for every
    attribute of `LINKED_DATA_ATTRIBUTES`.

    Args:
        parser: A jsonargparse parser with subclass groups `data` and `model`.
        model_key: Where the model's constructor arguments live in the parser.
    """
    for name in LINKED_DATA_ATTRIBUTES:
        parser.link_arguments(f"data.{name}", f"{model_key}.{name}", apply_on="instantiate")
