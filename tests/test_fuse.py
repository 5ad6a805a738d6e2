"""FUSE: budget, the two-player step, RSM/CBG terms, class-wise mode, export, `fuse protect`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from fuse_lightning.checkpoints import register_safe_globals
from fuse_lightning.cli import main
from fuse_lightning.data import CIFAR10DataModule
from fuse_lightning.fuse_module import CBGConfig, FUSEModule, RSMConfig
from fuse_lightning.protect import protect_dataset, verify_manifest

REPO = Path(__file__).resolve().parents[1]
# The CPU-sized FUSE config: an overlay composed after the main config.
FUSE_CPU = ["--config", str(REPO / "configs" / "fuse_cifar10.yaml"),
            "--config", str(REPO / "configs" / "fuse_cifar10_cpu.yaml")]


def small_fuse(**kwargs) -> FUSEModule:
    defaults = dict(surrogate_arch="fastnet", surrogate_kwargs={"width": 0.25}, generator_width=8, log_spectrum_every_n_steps=1)
    return FUSEModule(**{**defaults, **kwargs})


def tiny_dm(root: Path, **kwargs) -> CIFAR10DataModule:
    return CIFAR10DataModule(data_dir=str(root), batch_size=32, check_counts=False, augment=False, **kwargs)


def test_delta_never_exceeds_eps_even_with_huge_generator_outputs():
    torch.manual_seed(0)
    model = small_fuse(eps=8)
    with torch.no_grad():
        for p in model.generator.parameters():
            p.mul_(50)  # saturate tanh
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    delta = model.perturbation(x, y)
    assert delta.abs().max() <= 8 / 255 + 1e-7
    assert delta.abs().max() > 7.9 / 255  # really saturated: the bound is what stops it


def test_generator_step_leaves_surrogate_untouched():
    torch.manual_seed(0)
    model = small_fuse()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    before = copy.deepcopy(model.surrogate.state_dict())  # weights and BN running stats
    generator_before = copy.deepcopy(model.generator.state_dict())
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=1e-2)
    model.surrogate.eval()
    model.surrogate.requires_grad_(False)
    model.generator_losses(x, y)["loss_generator"].backward()
    opt_g.step()
    for name, tensor in model.surrogate.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    changed = [n for n, t in model.generator.state_dict().items() if not torch.equal(t, generator_before[n])]
    assert changed, "the generator step must change the generator"


def test_one_training_step_changes_generator_and_surrogate(tiny_cifar10: Path):
    torch.manual_seed(0)
    model = small_fuse()
    surrogate_before = copy.deepcopy(model.surrogate.state_dict())
    generator_before = copy.deepcopy(model.generator.state_dict())
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(model, datamodule=tiny_dm(tiny_cifar10))
    assert trainer.global_step == 2  # manual optimization: both optimizer steps count
    assert any(not torch.equal(t, surrogate_before[n]) for n, t in model.surrogate.state_dict().items())
    assert any(not torch.equal(t, generator_before[n]) for n, t in model.generator.state_dict().items())
    for key in ("train/loss_em", "train/loss_rsm", "train/loss_low", "train/loss_high", "train/loss_consistency",
                "train/loss_high_energy", "train/loss_generator", "train/surrogate_acc", "delta_band/0.00-0.25",
                "delta/class_share", "delta/code_rank"):
        assert key in trainer.callback_metrics, key


@pytest.mark.parametrize(
    ("rsm", "cbg", "expected", "absent"),
    [
        (True, True, {"loss_em", "loss_rsm", "loss_low", "loss_high", "loss_consistency"}, set()),
        (False, True, {"loss_em", "loss_low", "loss_consistency"}, {"loss_rsm"}),
        (True, False, {"loss_rsm", "loss_em"}, {"loss_low", "loss_consistency", "loss_high_energy"}),
        (False, False, {"loss_em"}, {"loss_rsm", "loss_low", "loss_consistency"}),
    ],
)
def test_ablation_switches_select_loss_terms(rsm, cbg, expected, absent):
    torch.manual_seed(0)
    model = small_fuse(rsm=RSMConfig(enabled=rsm), cbg=CBGConfig(enabled=cbg))
    terms = model.generator_losses(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert expected <= set(terms)
    assert not (absent & set(terms))
    if not rsm and not cbg:  # plain error-minimizing generator: total == CE on x + delta
        assert torch.allclose(terms["loss_generator"], terms["loss_em"])


@pytest.mark.parametrize("augment", ["crop_flip", "resized_crop"])
def test_victim_augmentation_reaches_both_players(augment):
    """With `augment`, the surrogate's inputs are augmented copies of x + delta (not x + delta
    itself) and the generator's loss still has a gradient through the augmentation."""
    torch.manual_seed(0)
    model = small_fuse(augment=augment, augment_scale=(0.25, 0.5))
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    aligned = (x + model.perturbation(x, y)).clamp(0, 1).detach()
    seen = model.surrogate_inputs(x, y)
    assert seen.shape == aligned.shape and not torch.allclose(seen, aligned)
    assert float(seen.min()) >= 0.0 and float(seen.max()) <= 1.0
    model.generator_losses(x, y)["loss_generator"].backward()
    grads = [p.grad for p in model.generator.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_unknown_augmentation_is_rejected():
    with pytest.raises(ValueError, match="model.augment"):
        small_fuse(augment="mixup")
    with pytest.raises(ValueError, match="model.augment_scale"):
        small_fuse(augment="resized_crop", augment_scale=(0.5, 0.1))


def test_classwise_mode_gives_one_delta_per_class(tiny_cifar10: Path):
    torch.manual_seed(0)
    model = small_fuse(mode="classwise")
    dm = tiny_dm(tiny_cifar10)
    perturb = model.make_perturb_fn(dm)
    x, y = torch.rand(20, 3, 32, 32), torch.arange(20) % 10
    delta = perturb(x, y, torch.arange(20))
    for c in range(10):
        same = delta[y == c]
        assert torch.equal(same[0], same[1])
    assert not torch.equal(delta[0], delta[1])
    assert delta.abs().max() <= 8 / 255 + 1e-7


def test_export_loads_through_datamodule_and_matches_manifest(tiny_cifar10: Path, tmp_path: Path):
    torch.manual_seed(0)
    model = small_fuse()
    with torch.no_grad():
        for p in model.generator.parameters():
            p.mul_(20)  # large perturbations: the uint8 clip must hold the budget
    dm = tiny_dm(tiny_cifar10)
    out = protect_dataset(dm, model.make_perturb_fn(dm), tmp_path / "protected", eps=8, manifest={"method": "fuse"}, progress=False)
    manifest = verify_manifest(out)
    assert manifest["num_images"] == 200 and manifest["eps_255"] == 8
    assert manifest["fidelity"]["linf_uint8"] <= 8
    assert 20 < manifest["fidelity"]["psnr"] < 60
    protected = tiny_dm(tiny_cifar10, protected_dir=str(out))
    protected.setup("fit")
    clean = tiny_dm(tiny_cifar10)
    clean.setup("fit")
    diff = (protected.train_images.int() - clean.train_images.int()).abs()
    assert diff.max() <= 8 and diff.float().mean() > 1  # in budget, and really perturbed
    assert torch.equal(protected.train_labels, clean.train_labels)
    # Tampering is detected.
    batch = next(out.rglob("data_batch_1"))
    batch.write_bytes(batch.read_bytes()[:-10])
    with pytest.raises(ValueError, match="data_batch_1"):
        verify_manifest(out)
    # Refuses to overwrite without the flag.
    with pytest.raises(FileExistsError, match="overwrite"):
        protect_dataset(dm, model.make_perturb_fn(dm), out, eps=8, progress=False)


def test_fuse_protect_cli_on_a_folder_of_mixed_sizes(tiny_cifar10: Path, tmp_path: Path):
    torch.manual_seed(0)
    ckpt_dir = tmp_path / "run"
    main(["fit", *FUSE_CPU, "--data.data_dir", str(tiny_cifar10), "--data.check_counts", "false",
          "--data.train_subset", "null", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
          "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                               "init_args": {"dirpath": str(ckpt_dir), "save_last": True}}])])
    ckpt = ckpt_dir / "last.ckpt"
    assert ckpt.is_file()
    folder = tmp_path / "photos"
    (folder / "holiday").mkdir(parents=True)
    sizes = {"a.png": (37, 50), "holiday/b.jpg": (64, 64), "c.png": (21, 33)}
    g = torch.Generator().manual_seed(0)
    for name, (h, w) in sizes.items():
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(folder / name)
    out = tmp_path / "protected_photos"
    args = ["protect", "--ckpt", str(ckpt), *FUSE_CPU, "--data.data_dir", str(tiny_cifar10),
            "--images", str(folder), "--out", str(out)]
    assert main(args) == 0
    manifest = verify_manifest(out)
    assert len(manifest["images"]) == 3
    for name, (h, w) in sizes.items():
        target = out / (name + ".png")  # the source name is kept: a.png -> a.png.png
        protected = torch.from_numpy(__import__("numpy").array(Image.open(target)))
        with Image.open(folder / name) as img:
            clean = torch.from_numpy(__import__("numpy").array(img.convert("RGB")))
        assert protected.shape == (h, w, 3)
        if name.endswith(".png"):  # lossless source: exact budget check
            assert (protected.int() - clean.int()).abs().max() <= 8
    with pytest.raises(SystemExit) as err:
        main(args)  # exists: refuse without --overwrite
    assert err.value.code != 0
    with pytest.raises(SystemExit) as err:
        main(["protect", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")])
    assert err.value.code != 0


def exported_files(directory: Path) -> dict[str, bytes]:
    """Every file of an export but its manifest (which records times and paths)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_fuse_protect_from_the_checkpoint_alone(tiny_cifar10: Path, tmp_path: Path, monkeypatch):
    """`fuse protect --ckpt X --out Y` needs no config: the checkpoint's saved hyperparameters rebuild
    the model and the DataModule, and the export has the same bytes as one made with the config."""
    import shutil

    from fuse_lightning.checkpoints import load_checkpoint

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    data = ["--data.data_dir", str(tiny_cifar10), "--data.check_counts", "false", "--data.train_subset", "null",
            "--data.download", "false"]
    # eps 32: after two steps the generator's delta already survives the rounding to uint8.
    assert main(["fit", *FUSE_CPU, *data, "--model.eps", "32", "--trainer.max_steps", "2",
                 "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                 "--trainer.logger", "false", "--trainer.default_root_dir", "run"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(ckpt)
    assert saved["datamodule_hyper_parameters"]["_class_path"].endswith("CIFAR10DataModule")
    assert saved["hyper_parameters"]["generator_arch"] == "encdec"  # the overlay's, not the base's
    assert main(["protect", "--ckpt", str(ckpt), "--out", "alone"]) == 0
    assert main(["protect", "--ckpt", str(ckpt), "--out", "with_config", *FUSE_CPU, *data,
                 "--model.eps", "32"]) == 0
    moved = tmp_path / "moved"
    shutil.copytree(tiny_cifar10, moved)
    assert main(["protect", "--ckpt", str(ckpt), "--out", "moved_data", "--data.data_dir", str(moved)]) == 0
    alone = exported_files(tmp_path / "alone")
    assert len(alone) == 6 and alone == exported_files(tmp_path / "with_config")
    assert alone == exported_files(tmp_path / "moved_data") == exported_files(tmp_path / "run" / "protected")
    manifest = verify_manifest(tmp_path / "alone")
    assert 0 < manifest["fidelity"]["linf_uint8"] <= 32 and manifest["num_images"] == 200
    assert manifest["eps_255"] == 32 and manifest["data_config"]["data_dir"] == str(tiny_cifar10)
    assert verify_manifest(tmp_path / "moved_data")["data_config"]["data_dir"] == str(moved)


def test_killed_run_resumes_from_last_checkpoint(tiny_cifar10: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    callbacks = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}])
    common = [*FUSE_CPU, "--data.data_dir", str(tiny_cifar10), "--data.check_counts", "false",
              "--data.train_subset", "null", "--data.batch_size", "100", "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.callbacks", callbacks]
    main(["fit", *common, "--trainer.max_epochs", "1"])  # "killed" after one epoch
    register_safe_globals()
    first = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert first["epoch"] == 0 and first["global_step"] == 4  # 2 batches x 2 optimizers
    main(["fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    resumed = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 8  # continued, not restarted


def test_imagenet_subset_export_streams_png_tree_in_budget(tiny_imagenet: Path, tmp_path: Path):
    from fuse_lightning.data import ImageNetSubsetDataModule

    def dm(**kw):
        return ImageNetSubsetDataModule(data_dir=str(tiny_imagenet), num_classes=3, image_size=32, num_workers=0,
                                        augment=False, batch_size=4, eval_batch_size=4, **kw)

    torch.manual_seed(0)
    model = small_fuse(num_classes=3)
    out = protect_dataset(dm(), model.make_perturb_fn(), tmp_path / "protected", eps=8, progress=False)
    manifest = verify_manifest(out)
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == manifest["num_images"] == 18  # 3 classes x 6 images, written batch by batch
    assert manifest["fidelity"]["linf_uint8"] <= 8
    import numpy as np

    clean = dm()
    clean.setup("fit")
    x_c = torch.cat([b[0] for b in clean.protect_dataloader()])  # source order: class, then name
    x_p = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in pngs])
    assert x_p.shape == x_c.shape == (18, 3, 32, 32)
    diff = (x_p.int() - x_c.int()).abs()
    assert diff.max() <= 8 and diff.float().mean() > 0.01  # in budget, and really perturbed
    protected = dm(protected_dir=str(out))
    protected.setup("fit")
    images, labels = next(iter(protected.train_dataloader()))[:2]
    assert images.shape[1:] == (3, 32, 32) and set(labels.tolist()) <= {0, 1, 2}


def test_protect_on_fit_end_exports_into_the_run_by_default(tiny_cifar10, tmp_path, monkeypatch):
    """The shipped configs leave out_dir unset: the export lands in <default_root_dir>/protected."""
    from fuse_lightning.callbacks import export_dir

    assert export_dir(None, "runs/a") == Path("runs/a/protected")
    assert export_dir("elsewhere", "runs/a") == Path("elsewhere")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run_a"
    assert main(["fit", *FUSE_CPU,
                 "--data.data_dir", str(tiny_cifar10), "--data.check_counts", "false",
                 "--data.train_subset", "null", "--data.test_subset", "null", "--data.download", "false",
                 "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                 "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(run)]) == 0
    verify_manifest(run / "protected")
    assert (run / "checkpoints" / "last.ckpt").is_file()  # where gpu_check's protect stage looks
    assert not (tmp_path / "outputs" / "protected").exists()


def test_code_overlap_term_enters_the_generator_loss():
    torch.manual_seed(0)
    x, y = torch.rand(20, 3, 32, 32), torch.arange(5).repeat(4)
    plain = small_fuse()
    torch.manual_seed(0)
    weighted = small_fuse(code_overlap_weight=2.0)
    weighted.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    base = plain.generator_losses(x, y)
    torch.manual_seed(1)
    terms = weighted.generator_losses(x, y)
    assert "loss_code_overlap" not in base
    assert 0.0 <= float(terms["loss_code_overlap"]) <= 1.0
    assert torch.allclose(terms["loss_generator"], base["loss_generator"] + 2.0 * terms["loss_code_overlap"], atol=1e-5)
    with pytest.raises(ValueError, match="code_overlap_weight"):
        small_fuse(code_overlap_weight=-1.0)
