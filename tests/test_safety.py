"""Files handed around (CIFAR pickles, checkpoints) never run code when loaded."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fuse_lightning.checkpoints import CheckpointError, load_checkpoint
from fuse_lightning.cli import main
from fuse_lightning.data.cifar_format import DatasetFormatError, read_cifar, write_cifar

REPO = Path(__file__).resolve().parents[1]


class MarkerPayload:
    """Unpickling this calls `open(marker, "w")`: the marker file appears if code runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_cifar(root: Path, payload) -> Path:
    """A CIFAR-10 tree whose first training batch carries `payload` beside valid data."""
    labels = torch.arange(20) % 10
    write_cifar(root, torch.zeros(20, 3, 32, 32, dtype=torch.uint8), labels, "cifar10", "train")
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    entry = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3], "extra": payload}
    batch.write_bytes(pickle.dumps(entry, protocol=2))
    return batch


def test_crafted_cifar_batch_is_refused_without_running_code(tmp_path: Path):
    marker = tmp_path / "pwned"
    batch = crafted_cifar(tmp_path / "data", MarkerPayload(marker))
    with pytest.raises(DatasetFormatError) as err:
        read_cifar(tmp_path / "data", "cifar10", "train")
    assert not marker.exists()
    assert str(batch) in str(err.value) and "refusing" in str(err.value)


@pytest.mark.parametrize("protocol", [2, 5])
def test_object_arrays_are_refused(tmp_path: Path, protocol: int):
    write_cifar(tmp_path, torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10), "cifar10", "train")
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    entry = {"data": np.array([[1, "x"]], dtype=object), "labels": [0]}
    batch.write_bytes(pickle.dumps(entry, protocol=protocol))
    with pytest.raises(DatasetFormatError, match="not numeric"):
        read_cifar(tmp_path, "cifar10", "train")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_cifar_pickles_of_any_protocol_still_load(tmp_path: Path, protocol: int):
    write_cifar(tmp_path, torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10), "cifar10", "train")
    for batch in (tmp_path / "cifar-10-batches-py").glob("data_batch_*"):
        with batch.open("rb") as fh:
            entry = pickle.load(fh)
        batch.write_bytes(pickle.dumps({k.encode(): v for k, v in entry.items()}, protocol=protocol))
    images, labels = read_cifar(tmp_path, "cifar10", "train")
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == list(range(10))


def test_crafted_checkpoint_is_refused_without_running_code(tmp_path: Path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": MarkerPayload(marker)}}, ckpt)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    assert not marker.exists() and str(ckpt) in str(err.value)


def test_fuse_protect_refuses_crafted_checkpoint(tiny_cifar10: Path, tmp_path: Path, capsys):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": MarkerPayload(marker)}, ckpt)
    args = ["protect", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"),
            "--config", str(REPO / "configs" / "fuse_cifar10.yaml"),
            "--config", str(REPO / "configs" / "fuse_cifar10_cpu.yaml"),
            "--data.data_dir", str(tiny_cifar10), "--data.check_counts", "false"]
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code != 0
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert "refusing to load" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["model", "data", "filter"])
def test_fuse_protect_imports_no_class_a_checkpoint_names(where: str, tmp_path: Path, monkeypatch, capsys):
    """The classes a checkpoint's hyperparameters name must already be imported: `fuse protect`
    rebuilds the model and the DataModule from them, and importing a module runs its code."""
    import sys

    marker = tmp_path / "imported"
    (tmp_path / "evil_classes.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = {"eps": 8.0}
    data = {"_class_path": "fuse_lightning.data.CIFAR10DataModule", "data_dir": str(tmp_path)}
    if where == "model":
        model["_class_path"] = "evil_classes.Evil"
    elif where == "data":
        data["_class_path"] = "evil_classes.Evil"
    else:
        data["train_filter"] = {"class_path": "evil_classes.Evil", "init_args": {}}
    ckpt = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": model, "datamodule_hyper_parameters": data}, ckpt)
    with pytest.raises(SystemExit) as err:
        main(["protect", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")])
    assert err.value.code != 0
    assert "refusing the class 'evil_classes.Evil'" in capsys.readouterr().err
    assert not marker.exists() and "evil_classes" not in sys.modules and not (tmp_path / "out").exists()


def test_project_checkpoint_types_load_weights_only(tmp_path: Path):
    from fuse_lightning.fuse_module import CBGConfig, RSMConfig

    ckpt = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"rsm": RSMConfig(), "cbg": CBGConfig()}}, ckpt)
    state = load_checkpoint(ckpt)
    assert isinstance(state["hyper_parameters"]["rsm"], RSMConfig)
