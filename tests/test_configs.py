"""Every shipped config composes and runs one `fast_dev_run` step on CPU (tiny generated data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fuse_lightning.cli import build_cli, main

REPO = Path(__file__).resolve().parents[1]
RUNNABLE = sorted(p for p in (REPO / "configs").glob("*.yaml"))
OVERLAYS = {  # composed after a base config, holding only what differs from it
    "fuse_cifar10_cpu.yaml": "fuse_cifar10.yaml",
    "fuse_cifar10_cpu_whole_set.yaml": "fuse_cifar10_cpu.yaml",
    "fuse_cifar100.yaml": "fuse_cifar10.yaml",
    "victim_cpu.yaml": "victim_cifar10.yaml",
    "victim_fast_cpu.yaml": "victim_cifar10.yaml",
    "victim_cifar100.yaml": "victim_cifar10.yaml",
    "fuse_tiny_imagenet_cpu.yaml": "fuse_imagenet_subset.yaml",
    "victim_tiny_imagenet_cpu.yaml": "victim_imagenet_subset.yaml",
}


def composed(config: str) -> list[Path]:
    """The config files a shipped config is used with, in order: its bases (if any), then itself."""
    base = OVERLAYS.get(config)
    return [*(composed(base) if base else []), REPO / "configs" / config]


def config_args(configs: list[Path]) -> list[str]:
    return [word for c in configs for word in ("--config", str(c))]


def data_args(configs: Path | list[Path], tiny: dict[str, Path]) -> list[str]:
    """Flags that point the (composed) config at tiny generated data."""
    text = "".join(c.read_text() for c in ([configs] if isinstance(configs, Path) else configs))
    if "ImageNetSubsetDataModule" in text:
        return ["--data.data_dir", str(tiny["imagenet"]), "--data.image_size", "32", "--data.num_workers", "0",
                "--data.num_classes", "3"]
    root = tiny["cifar100"] if "CIFAR100DataModule" in text else tiny["cifar10"]
    return ["--data.data_dir", str(root), "--data.check_counts", "false", "--data.train_subset", "null",
            "--data.test_subset", "null", "--data.download", "false"]


@pytest.mark.parametrize("config", RUNNABLE, ids=lambda p: p.stem)
def test_config_fast_dev_run(config: Path, tiny_cifar10, tiny_cifar100, tiny_imagenet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # logs/, outputs/ of the run stay in the temporary directory
    torch.manual_seed(0)
    configs = composed(config.name)
    tiny = {"cifar10": tiny_cifar10, "cifar100": tiny_cifar100, "imagenet": tiny_imagenet}
    args = ["fit", *config_args(configs), *data_args(configs, tiny), "--trainer.fast_dev_run", "1",
            "--trainer.enable_progress_bar", "false"]
    assert main(args) == 0


GROUPS = ("trainer", "logger", "debug")
OVERLAY_FILES = sorted(p for group in GROUPS for p in (REPO / "configs" / group).glob("*.yaml"))
MAIN_CONFIGS = [p.name for p in RUNNABLE]  # each with its base when it is an overlay


@pytest.mark.parametrize("main_config", MAIN_CONFIGS)
@pytest.mark.parametrize("overlay", OVERLAY_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_groups_compose(overlay: Path, main_config: str, tmp_path, capsys, monkeypatch):
    """Every group overlay (trainer/, logger/, debug/) composes with every main config; last wins."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", *config_args(composed(main_config)), "--config", str(overlay),
                   "--trainer.default_root_dir", "runs/x", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    expected = {
        "gpu": ["accelerator: gpu", "precision: bf16-mixed"],
        "cpu": ["accelerator: cpu", "precision: 32-true"],
        "ddp": ["strategy: ddp"],
        "wandb": ["WandbLogger", "save_dir: runs/x"],
        "csv": ["CSVLogger", "save_dir: runs/x"],
        "fast_dev_run": ["fast_dev_run: 1"],
        "limits": ["limit_train_batches: 10"],
    }[overlay.stem]
    for text in expected:
        assert text in printed, (text, overlay)


def printed_config(configs: list[Path], capsys) -> dict:
    with pytest.raises(SystemExit):
        build_cli(["fit", *config_args(configs), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def callback_names(config: dict) -> list[str]:
    return [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]]


def test_overlays_compose_to_the_full_recipe(capsys):
    """An overlay changes only what it names: the rest (also the data's init_args across a class_path
    change) comes from its base, and a list (callbacks) replaces the base's list as a whole."""
    base = printed_config(composed("fuse_cifar10.yaml"), capsys)
    c100 = printed_config(composed("fuse_cifar100.yaml"), capsys)
    cpu = printed_config(composed("fuse_cifar10_cpu.yaml"), capsys)
    assert c100["data"]["class_path"] == "fuse_lightning.data.CIFAR100DataModule"
    assert c100["data"]["init_args"] == base["data"]["init_args"]  # batch 256, test_subset 2000, augment off
    assert c100["data"]["init_args"]["batch_size"] == 256 and c100["data"]["init_args"]["augment"] is False
    assert c100["model"]["init_args"] == {**base["model"]["init_args"], "label_embed_dim": 16}
    assert c100["trainer"]["default_root_dir"] == "outputs/fuse_cifar100"
    assert c100["trainer"]["logger"]["init_args"]["save_dir"] == "outputs/fuse_cifar100"
    assert callback_names(base)[0] == "ThroughputLogger"
    assert callback_names(c100) == callback_names(cpu) == ["ModelCheckpoint", "PerturbationMonitor", "ProtectOnFitEnd"]
    model, data = cpu["model"]["init_args"], cpu["data"]["init_args"]
    assert (model["generator_arch"], model["generator_width"], model["surrogate_arch"]) == ("encdec", 16, "fastnet")
    assert model["surrogate_kwargs"] == {"width": 0.5} and model["rsm"] == base["model"]["init_args"]["rsm"]
    assert model["generator_optimizer"]["init_args"]["lr"] == 2.0e-3
    assert model["surrogate_optimizer"]["init_args"] == {**base["model"]["init_args"]["surrogate_optimizer"]["init_args"],
                                                         "lr": 0.05}
    assert cpu["data"]["class_path"] == "fuse_lightning.data.CIFAR10DataModule"
    assert (data["batch_size"], data["train_subset"], data["test_subset"], data["augment"]) == (128, 5000, 1000, False)
    assert (cpu["trainer"]["max_epochs"], cpu["trainer"]["log_every_n_steps"]) == (8, 5)
    victim = printed_config(composed("victim_cifar10.yaml"), capsys)
    v100 = printed_config(composed("victim_cifar100.yaml"), capsys)
    assert v100["data"]["class_path"] == "fuse_lightning.data.CIFAR100DataModule"
    assert v100["data"]["init_args"] == victim["data"]["init_args"] and v100["model"] == victim["model"]
    assert callback_names(v100) == ["ModelCheckpoint", "LearningRateMonitor"]
    assert v100["trainer"]["default_root_dir"] == "outputs/victim_cifar100"


def test_debug_and_logger_groups_run(tiny_cifar10, tmp_path, monkeypatch):
    """A main config + trainer/cpu + logger/csv + debug/limits really trains, into one run dir."""
    monkeypatch.chdir(tmp_path)
    configs = [REPO / "configs" / c for c in ("victim_cifar10.yaml", "victim_cpu.yaml", "trainer/cpu.yaml",
                                               "logger/csv.yaml", "debug/limits.yaml")]
    args = ["fit", *[w for c in configs for w in ("--config", str(c))],
            *data_args(REPO / "configs" / "victim_cifar10.yaml", {"cifar10": tiny_cifar10}),
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.default_root_dir", "runs/one", "--trainer.enable_progress_bar", "false"]
    assert main(args) == 0
    assert list((tmp_path / "runs" / "one" / "logs").rglob("metrics.csv")), "CSV logs in the run directory"
    assert list((tmp_path / "runs" / "one" / "checkpoints").glob("*.ckpt")), "checkpoints in the run directory"


def test_dotted_override_and_help(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(REPO / "configs" / "victim_cifar10.yaml"), "--model.arch", "fastnet",
                   "--data.train_filter", "lowpass-ideal-0.25", "--print_config"])
    printed = capsys.readouterr().out
    assert "arch: fastnet" in printed and "lowpass-ideal-0.25" in printed
    with pytest.raises(SystemExit):
        build_cli(["fit", "--model.help", "VictimModule"])  # per-class help in subclass mode
    assert "Classifier name from the registry" in capsys.readouterr().out  # Args: docstring -> --help


def test_bad_option_exits_non_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "victim_cifar10.yaml"), "--model.no_such_option", "1"])
    assert exit_info.value.code != 0
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "does_not_exist.yaml")])
    assert exit_info.value.code != 0
    assert "does_not_exist.yaml" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_channels_last_fast_dev_run(tiny_cifar10, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(REPO / "configs" / "fuse_cifar10.yaml"), "--config",
                 str(REPO / "configs" / "trainer" / "gpu.yaml"), "--trainer.devices", "1",
                 *data_args(REPO / "configs" / "fuse_cifar10.yaml", {"cifar10": tiny_cifar10}),
                 "--trainer.fast_dev_run", "2"]) == 0


def test_wandb_offline_logging(tiny_cifar10, tmp_path, monkeypatch):
    """With the W&B overlay and no network, runs log offline (scalars and the image panels)."""
    pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):  # nothing under ~
        monkeypatch.setenv(var, str(tmp_path))
    configs = composed("fuse_cifar10_cpu.yaml")
    assert main(["fit", *config_args(configs), "--config", str(REPO / "configs" / "logger" / "wandb.yaml"),
                 *data_args(configs, {"cifar10": tiny_cifar10}), "--trainer.max_epochs", "1",
                 "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                 "--trainer.enable_progress_bar", "false"]) == 0
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs, "an offline W&B run directory is written"
    media = list(tmp_path.rglob("offline-run-*/files/media/images/**/*.png"))
    assert any("grid_clean_delta_protected" in p.name for p in media), media


def test_run_directory_is_one_flag(capsys):
    """`${trainer.default_root_dir}` in a config follows a later --trainer.default_root_dir flag."""
    config = REPO / "configs" / "fuse_cifar10.yaml"
    assert "${trainer.default_root_dir}" in config.read_text()
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(config), "--trainer.default_root_dir", "/elsewhere/run", "--print_config"])
    printed = capsys.readouterr().out
    assert "save_dir: /elsewhere/run" in printed and "default_root_dir: /elsewhere/run" in printed
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(config), "--print_config"])
    assert "save_dir: outputs/fuse_cifar10" in capsys.readouterr().out


@pytest.mark.parametrize("main_config", ["fuse_cifar10.yaml", "fuse_cifar10_cpu.yaml", "fuse_cifar100.yaml"])
def test_method_overlays_compose_with_the_fuse_configs(main_config: str, capsys):
    """configs/method/*.yaml change the method only: composed last over a FUSE config, they set
    their keys, keep the rest of the model (e.g. CBG's other settings) and the main config's data."""
    base = printed_config(composed(main_config), capsys)
    grey = printed_config([*composed(main_config), REPO / "configs" / "method" / "grey_code.yaml"], capsys)
    args, base_args = grey["model"]["init_args"], base["model"]["init_args"]
    assert (args["luma_share"], args["output_code_size"], args["augment"]) == (1.0, 8, "crop_flip")
    assert args["cbg"] == {**base_args["cbg"], "enabled": False}
    assert args["rsm"] == {**base_args["rsm"], "enabled": False}
    assert args["surrogate_arch"] == base_args["surrogate_arch"]
    assert grey["data"] == base["data"]
