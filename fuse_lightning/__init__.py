"""fuse-lightning: full-spectrum unlearnable examples (FUSE) with PyTorch Lightning."""

__version__ = "0.1.0"
