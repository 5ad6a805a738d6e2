"""User errors print a short message naming the thing and the fix, exit != 0, leave nothing behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fuse_lightning.cli import main, user_error_message

REPO = Path(__file__).resolve().parents[1]
FUSE_CPU = ["--config", str(REPO / "configs" / "fuse_cifar10.yaml"),
            "--config", str(REPO / "configs" / "fuse_cifar10_cpu.yaml")]


def fit_args(data_dir: Path, *extra: str) -> list[str]:
    return ["fit", *FUSE_CPU, "--data.data_dir", str(data_dir), "--data.download", "false",
            "--data.check_counts", "false", "--data.train_subset", "null", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", *extra]


def corrupt_copy(tiny: Path, dest: Path) -> Path:
    shutil.copytree(tiny, dest)
    batch = dest / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:100])
    return dest


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "test_batch: file not found"),
        ("corrupt", "data_batch_2: could not unpickle"),
        ("eps", "model.eps is in 0-255 units"),
        ("filter", "unknown filter name 'nosuchfilter'"),
    ],
)
def test_user_errors_are_one_short_message(case, expected, tiny_cifar10, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = {"missing": tmp_path / "nowhere", "corrupt": None}.get(case, tiny_cifar10)
    if case == "corrupt":
        data = corrupt_copy(tiny_cifar10, tmp_path / "corrupt")
    extra = {"eps": ["--model.eps", "-3"], "filter": ["--data.train_filter", "nosuchfilter"]}.get(case, [])
    assert main(fit_args(data, *extra)) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fuse: error") or line.startswith("(run with")]
    assert len(lines) == 2
    # Nothing half written: no log or checkpoint directory of the failed run stays behind.
    leftovers = [p for p in tmp_path.rglob("*") if p.is_dir() and "corrupt" not in p.parts]
    assert leftovers == [] or all(not any(d.rglob("*.*")) for d in leftovers)
    assert not [p for p in tmp_path.rglob("version_*")]


def test_debug_flag_shows_the_traceback(tiny_cifar10, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="model.eps"):
        main(fit_args(tiny_cifar10, "--model.eps", "-3", "--debug"))


def test_bugs_keep_their_traceback():
    assert user_error_message(TypeError("unsupported operand")) is None
    try:
        try:
            raise TypeError("a bug inside a constructor")
        except TypeError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as wrapped:
        assert user_error_message(wrapped) is None
    assert user_error_message(FileNotFoundError("x.yaml does not exist")) == "x.yaml does not exist"


def test_failed_download_leaves_no_empty_directories(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    from fuse_lightning.data import CIFAR10DataModule
    from fuse_lightning.data.cifar_format import DatasetFormatError

    def offline(root, train=True, download=False):
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "new" / "data"), download=True)
    with pytest.raises(DatasetFormatError, match="download failed"):
        dm.prepare_data()
    assert list(tmp_path.iterdir()) == []
