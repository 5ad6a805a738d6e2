"""Protected sets are checked against their manifest; exports keep permissions and leave no temp dirs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from fuse_lightning.cli import main
from fuse_lightning.data import CIFAR10DataModule
from fuse_lightning.manifest import ManifestError, content_fingerprint, verify_manifest
from fuse_lightning.protect import protect_dataset


def tiny_dm(root: Path, **kwargs) -> CIFAR10DataModule:
    return CIFAR10DataModule(data_dir=str(root), batch_size=50, check_counts=False, augment=False, **kwargs)


def plus_two(images, labels, indices):
    return torch.full_like(images, 2 / 255)


@pytest.fixture()
def exported(tiny_cifar10: Path, tmp_path: Path) -> Path:
    return protect_dataset(tiny_dm(tiny_cifar10), plus_two, tmp_path / "protected", eps=8, progress=False)


def test_reader_verifies_manifest_by_default(tiny_cifar10: Path, exported: Path):
    dm = tiny_dm(tiny_cifar10, protected_dir=str(exported))
    dm.setup("fit")
    assert len(dm.train_labels) == 200
    # Also when pointed at the dataset directory inside the export.
    tiny_dm(tiny_cifar10, protected_dir=str(exported / "cifar-10-batches-py")).setup("fit")
    batch = exported / "cifar-10-batches-py" / "data_batch_2"
    raw = bytearray(batch.read_bytes())
    raw[-20] ^= 1  # one flipped bit in the pixel data: still a valid pickle
    batch.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="data_batch_2"):
        tiny_dm(tiny_cifar10, protected_dir=str(exported)).setup("fit")
    skipped = tiny_dm(tiny_cifar10, protected_dir=str(exported), verify_manifest=False)
    skipped.setup("fit")  # the flag skips the check
    assert len(skipped.train_labels) == 200


def test_unlisted_and_missing_files_and_no_manifest_are_errors(tiny_cifar10: Path, exported: Path):
    extra = exported / "cifar-10-batches-py" / "data_batch_6"
    extra.write_bytes(b"x")
    with pytest.raises(ManifestError, match="data_batch_6"):
        verify_manifest(exported)
    extra.unlink()
    (exported / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ManifestError, match="data_batch_3.*missing"):
        verify_manifest(exported)
    (exported / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="verify_manifest false"):
        tiny_dm(tiny_cifar10, protected_dir=str(exported)).setup("fit")


def test_manifest_entries_cannot_point_outside(exported: Path):
    manifest = json.loads((exported / "manifest.json").read_text())
    manifest["files"]["../outside"] = "0" * 64
    (exported / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="outside"):
        verify_manifest(exported)


def test_fuse_verify_command(exported: Path, capsys):
    assert main(["verify", str(exported)]) == 0
    assert "OK" in capsys.readouterr().out
    (exported / "cifar-10-batches-py" / "batches.meta").write_bytes(b"tampered")
    assert main(["verify", str(exported)]) == 1
    err = capsys.readouterr().err
    assert "batches.meta" in err and "Traceback" not in err


def test_export_keeps_the_umask_permissions(tiny_cifar10: Path, tmp_path: Path):
    old = os.umask(0o022)
    try:
        out = protect_dataset(tiny_dm(tiny_cifar10), plus_two, tmp_path / "p", eps=8, progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "manifest.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "cifar-10-batches-py").stat().st_mode) == 0o755


def test_failed_export_and_killed_exports_leave_no_temp_dirs(tiny_cifar10: Path, tmp_path: Path):
    def broken(images, labels, indices):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        protect_dataset(tiny_dm(tiny_cifar10), broken, tmp_path / "p", eps=8, progress=False)
    assert sorted(tmp_path.iterdir()) == []
    # What a kill -9 leaves: temp/old siblings whose writer process is gone.
    dead_pid = 2**22 + 12345
    for name in (f".p.tmp-{dead_pid}-abc", f".p.old-{dead_pid}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data_batch_1").write_bytes(b"half")
    alive = tmp_path / f".p.tmp-{os.getpid()}-concurrent"
    alive.mkdir()
    out = protect_dataset(tiny_dm(tiny_cifar10), plus_two, tmp_path / "p", eps=8, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, alive.name])


def test_export_of_the_subset_or_of_the_whole_training_set(tiny_cifar10: Path, tmp_path: Path):
    subset = protect_dataset(tiny_dm(tiny_cifar10, train_subset=50), plus_two, tmp_path / "s", eps=8, progress=False)
    whole = protect_dataset(
        tiny_dm(tiny_cifar10, train_subset=50), plus_two, tmp_path / "w", eps=8, progress=False, subset_only=False
    )
    assert json.loads((subset / "manifest.json").read_text())["num_images"] == 50
    assert json.loads((whole / "manifest.json").read_text())["num_images"] == 200
    clean = tiny_dm(tiny_cifar10)
    protected = tiny_dm(tiny_cifar10, protected_dir=str(whole))
    clean.setup("fit"), protected.setup("fit")
    # Every image, inside the subset or not, carries the perturbation (+2 where not clipped at 255).
    diff = protected.train_images.int() - clean.train_images.int()
    assert torch.equal(protected.train_labels, clean.train_labels)
    assert set(diff.unique().tolist()) <= {0, 1, 2} and bool((diff.flatten(1) == 2).any(1).all())


def test_content_fingerprint_tells_remade_sets_apart(tiny_cifar10: Path, exported: Path, tmp_path: Path):
    # The same perturbation exported again: other metadata (time, timings), same files.
    again = protect_dataset(tiny_dm(tiny_cifar10), plus_two, tmp_path / "again", eps=8, progress=False)
    first = content_fingerprint(exported)
    assert first is not None and len(first) == 16
    assert (exported / "manifest.json").read_bytes() != (again / "manifest.json").read_bytes()
    assert content_fingerprint(again) == first
    assert content_fingerprint(exported / "cifar-10-batches-py") == first  # the dataset dir inside
    # One pixel level different everywhere: another set, another fingerprint.
    other = protect_dataset(tiny_dm(tiny_cifar10), lambda x, y, i: torch.full_like(x, 3 / 255),
                            tmp_path / "other", eps=8, progress=False)
    assert content_fingerprint(other) != first
    assert content_fingerprint(tmp_path / "nothing_here") is None
