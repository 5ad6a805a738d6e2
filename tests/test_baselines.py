"""Baseline methods: budgets, export format, class structure, EM optimisation and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fuse_lightning.data.cifar as cifar_module
from fuse_lightning.baselines import (
    AutoregressivePerturbation,
    ErrorMinimizingNoise,
    LinearSeparablePatches,
    RandomNoise,
)
from fuse_lightning.baselines.synthetic import (
    ar_filter_response,
    ar_generate,
    ar_generate_reference,
    draw_ar_coefficients,
)
from fuse_lightning.cli import main
from fuse_lightning.data import CIFAR10DataModule, read_cifar, write_cifar
from fuse_lightning.protect import verify_manifest

N_TRAIN, N_TEST = 200, 50
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "baselines"


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """Tiny CIFAR-10 in the python pickle layout: 200 train / 50 test images, balanced labels."""
    root = tmp_path_factory.mktemp("cifar")
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
        labels = torch.arange(n) % 10
        write_cifar(root, images, labels, "cifar10", split)
    return root


@pytest.fixture(autouse=True)
def tiny_counts(monkeypatch):
    counts = {"train": N_TRAIN, "test": N_TEST}
    monkeypatch.setattr(cifar_module, "expected_counts", lambda variant, split: counts[split])


@pytest.fixture(autouse=True)
def few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def datamodule(root, **kw) -> CIFAR10DataModule:
    return CIFAR10DataModule(data_dir=str(root), batch_size=32, eval_batch_size=64, **kw)


def tiny_em(**kw) -> ErrorMinimizingNoise:
    args = dict(
        arch="fastnet", arch_kwargs={"width": 0.25}, pgd_steps=3, pgd_step_size=2.0,
        train_steps=5, max_rounds=2, stop_accuracy=1.01, batch_size=64, device="cpu",
        progress=False, lr=0.05,
    )
    return ErrorMinimizingNoise(**{**args, **kw})


def check_export(out, root, eps):
    """Manifest verifies, the copy reloads through the DataModule, the budget holds."""
    manifest = verify_manifest(out)
    assert manifest["fidelity"]["linf_uint8"] <= eps
    clean, labels = read_cifar(root, "cifar10", "train")
    dm = datamodule(root, protected_dir=str(out))
    dm.setup("fit")
    assert torch.equal(dm.train_labels, labels)
    diff = dm.train_images.int() - clean.int()
    assert diff.abs().max() <= eps
    assert diff.abs().max() > 0
    return manifest, diff.float() / 255, clean, labels


def test_random_noise_export_budget_and_per_image(cifar_root, tmp_path):
    method = RandomNoise(eps=8, seed=3)
    out = method.protect(datamodule(cifar_root), tmp_path / "random", progress=False)
    manifest, diff, _, _ = check_export(out, cifar_root, 8)
    assert manifest["method"] == "random_noise"
    assert manifest["method_args"] == {"eps": 8, "seed": 3}
    assert not torch.equal(diff[0], diff[1])  # a different draw per image
    # deterministic per index, regardless of the batch it comes in
    x = torch.rand(4, 3, 32, 32)
    a = method.perturb_fn(x, torch.zeros(4, dtype=torch.long), torch.tensor([5, 6, 7, 8]))
    b = method.perturb_fn(x[:1], torch.zeros(1, dtype=torch.long), torch.tensor([7]))
    assert torch.equal(a[2], b[0])
    assert a.abs().max() <= 8 / 255 and a.abs().max() > 7 / 255
    assert abs(float(a.mean())) < 0.1 * 8 / 255  # zero-mean uniform


def test_refuses_to_overwrite(cifar_root, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        RandomNoise().protect(datamodule(cifar_root), out, progress=False)


def test_lsp_budget_l2_and_linf(cifar_root, tmp_path):
    method = LinearSeparablePatches(eps=8, l2_rms=6.0, seed=1)
    out = method.protect(datamodule(cifar_root), tmp_path / "lsp", progress=False)
    manifest, diff, clean, labels = check_export(out, cifar_root, 8)
    budget = method.l2_budget((3, 32, 32))
    assert manifest["fit_info"]["patch_size"] == 8
    assert budget == pytest.approx(6 / 255 * 3072**0.5)
    norms = diff.flatten(1).norm(dim=1)
    # rounding moves each pixel by at most 0.5/255
    assert (norms <= budget + 0.5 / 255 * 3072**0.5).all()
    # before clipping to the image range, the perturbation has exactly the L2 budget
    delta = method.perturb_fn(clean.float() / 255, labels, torch.arange(N_TRAIN))
    assert delta.flatten(1).norm(dim=1).sub(budget).abs().max() < 0.02 * budget
    # constant on 8x8 patches (low frequency), and separable by class: nearest class centroid
    assert torch.equal(delta[:, :, :8, :8], delta[:, :, :1, :1].expand(-1, -1, 8, 8))
    grid = delta[:, :, ::8, ::8].flatten(1)
    centroids = method.centroids.flatten(1)
    pred = (grid @ centroids.T).argmax(1)
    assert torch.equal(pred, labels)
    # the patch size scales with the resolution
    big = LinearSeparablePatches(seed=1)
    big.setup(10, (3, 64, 64))
    assert big.fit_info["patch_size"] == 16 and tuple(big.centroids.shape) == (10, 3, 4, 4)


def test_ar_wavefront_matches_reference_and_is_class_dependent(cifar_root, tmp_path):
    coeffs = draw_ar_coefficients(2, 3, torch.Generator().manual_seed(0))
    init = torch.randn(2, 3, 10, 12, dtype=torch.float64)
    fast = ar_generate(coeffs, init)
    slow = torch.stack([ar_generate_reference(coeffs[k], init[k]) for k in range(2)])
    assert torch.allclose(fast, slow, rtol=1e-10, atol=1e-10)

    method = AutoregressivePerturbation(eps=8, seed=2)
    out = method.protect(datamodule(cifar_root), tmp_path / "ar", progress=False)
    manifest, _, clean, labels = check_export(out, cifar_root, 8)
    assert manifest["method"] == "ar"
    filters = method.filters()
    assert filters.shape == (10, 3, 3, 3)
    # filters differ by class
    flat = filters.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(10) * 1e9).min() > 1e-2
    delta = method.perturb_fn(clean.float() / 255, labels, torch.arange(N_TRAIN)).double()
    assert delta.abs().amax(dim=(1, 2, 3)).sub(8 / 255).abs().max() < 1e-6  # scaled to L-inf eps
    # a class's own AR filter annihilates its perturbations; the other classes' do not
    response = ar_filter_response(delta, filters)
    assert torch.equal(response.argmin(1), labels)
    own = response.gather(1, labels[:, None]).squeeze(1)
    others = response.clone().scatter_(1, labels[:, None], float("inf")).min(1).values
    assert (own < 1e-3 * others).all()
    # different images of one class get different perturbations
    assert not torch.allclose(delta[0], delta[10])


def test_em_classwise_one_delta_per_class(cifar_root, tmp_path):
    method = tiny_em(mode="classwise", max_rounds=1)
    dm = datamodule(cifar_root)
    dm.setup("fit")
    method.fit(dm)
    assert method.delta.shape == (10, 3, 32, 32)
    assert method.delta.abs().max() <= 8 / 255 + 1e-7
    grey = torch.full((20, 3, 32, 32), 0.5)  # mid-grey: the [0, 1] clip never binds
    labels = torch.arange(20) % 10
    delta = method.perturb_fn(grey, labels, torch.arange(20))
    assert torch.equal(delta[:10], delta[10:])
    assert not torch.allclose(delta[0], delta[1])
    out = method.protect(dm, tmp_path / "emc", progress=False)
    manifest, diff, _, _ = check_export(out, cifar_root, 8)
    assert manifest["method"] == "em_classwise"


class _SquareDistance(torch.nn.Module):
    """Logits (sum of (x - 0.5)^2, 0): the input gradient's sign depends on the image."""

    def forward(self, x):
        score = ((x - 0.5) ** 2).flatten(1).sum(1)
        return torch.stack([score, torch.zeros_like(score)], 1)


def test_em_classwise_update_rules_original_mean_against_summed_gradient():
    from fuse_lightning.baselines.em import pgd_min_classwise

    model, eps, step = _SquareDistance(), 0.03, 0.01
    # Two class-0 images on either side of 0.5 pull one pixel in opposite directions (the first
    # more strongly); class 1 is absent from the batch.
    x = torch.tensor([0.2, 0.7]).view(2, 1, 1, 1)
    y = torch.tensor([0, 0])
    start = torch.tensor([0.0, 0.02]).view(2, 1, 1, 1)
    mean = pgd_min_classwise(model, x, y, start, eps, step, steps=1, update="sample_mean")
    summed = pgd_min_classwise(model, x, y, start, eps, step, steps=1, update="summed_gradient")
    # the original rule: each sample steps on its own, the class takes the mean: steps cancel
    assert mean[0].item() == pytest.approx(0.0, abs=1e-7)
    # the summed gradient is the first image's sign: a full step down
    assert summed[0].item() == pytest.approx(-step, abs=1e-7)
    assert mean[1].item() == summed[1].item() == pytest.approx(0.02)  # absent class stays put
    # The original clips each sample to the image range before its step: images at 1.0 keep
    # none of +eps, then step up by 0.01 (away from 0.5), so the class's delta falls to 0.01;
    # the summed rule ignores the range and stays at +eps.
    x1, y1, at_eps = torch.ones(2, 1, 1, 1), torch.tensor([0, 0]), torch.tensor([eps, 0.0]).view(2, 1, 1, 1)
    clipped = pgd_min_classwise(model, x1, y1, at_eps, eps, step, 1)
    assert clipped[0].item() == pytest.approx(step, abs=1e-7)
    assert pgd_min_classwise(model, x1, y1, at_eps, eps, step, 1, update="summed_gradient")[0].item() == (
        pytest.approx(eps)
    )
    several = pgd_min_classwise(model, torch.rand(8, 3, 4, 4), torch.arange(8) % 2,
                                torch.zeros(2, 3, 4, 4), eps, step, steps=5)
    assert several.abs().max() <= eps + 1e-7
    with pytest.raises(ValueError, match="update must be"):
        pgd_min_classwise(model, x, y, start, eps, step, 1, update="mean")
    with pytest.raises(ValueError, match="classwise_update"):
        ErrorMinimizingNoise(mode="classwise", classwise_update="mean")


class _Templates(torch.nn.Module):
    """Linear logits <x, w_k>: per class a smooth template plus a stronger pixel-level one."""

    def __init__(self, classes: int = 4, size: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        smooth = torch.nn.functional.interpolate(torch.randn(classes, 3, 2, 2, generator=g), size=size,
                                                 mode="bilinear", align_corners=False)
        self.w = torch.nn.Parameter(smooth + 2 * torch.randn(classes, 3, size, size, generator=g), requires_grad=False)

    def forward(self, x):
        return torch.einsum("nchw,kchw->nk", x - 0.5, self.w)


def test_em_noise_fitted_through_the_augmentation_survives_it():
    """augment_noise: PGD through random resized crops (one draw per step) gives class noise
    that keeps the loss low on augmented views, where noise fitted on plain views does not."""
    from fuse_lightning.baselines.em import pgd_min_classwise
    from fuse_lightning.data.base import random_resized_crop_flip

    model, eps, step = _Templates(), 8 / 255, 0.5 / 255
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(64, 3, 16, 16, generator=g) * 0.5 + 0.25, torch.arange(64) % 4
    start = torch.zeros(4, 3, 16, 16)
    torch.manual_seed(0)
    plain = pgd_min_classwise(model, x, y, start, eps, step, steps=40)
    eot = pgd_min_classwise(lambda z: model(random_resized_crop_flip(z)), x, y, start, eps, step, steps=40)

    def loss_on_views(delta, augment):
        views = torch.Generator().manual_seed(2)
        xs = [(x + delta[y]).clamp(0, 1) for _ in range(16)]
        xs = [random_resized_crop_flip(v, generator=views) if augment else v for v in xs]
        return float(sum(torch.nn.functional.cross_entropy(model(v), y) for v in xs) / len(xs))

    clean = float(torch.nn.functional.cross_entropy(model(x), y))
    assert eot.abs().max() <= eps + 1e-7
    # each noise wins on the views it was fitted to
    assert loss_on_views(plain, False) < loss_on_views(eot, False) < clean
    assert loss_on_views(eot, True) < 0.8 * loss_on_views(plain, True)


def test_em_augment_options(cifar_root):
    with pytest.raises(ValueError, match="augment must be"):
        ErrorMinimizingNoise(augment="rotate")
    with pytest.raises(ValueError, match="augment_noise needs augment"):
        ErrorMinimizingNoise(augment_noise=True)
    method = tiny_em(mode="classwise", max_rounds=1, augment="resized_crop_flip", augment_noise=True)
    dm = datamodule(cifar_root)
    dm.setup("fit")
    method.fit(dm)
    assert method.delta.shape == (10, 3, 32, 32) and 0 < method.delta.abs().max() <= 8 / 255 + 1e-7
    assert method.config()["augment"] == "resized_crop_flip" and method.config()["augment_noise"] is True

def test_em_samplewise_minimises_surrogate_loss(cifar_root, tmp_path, capsys):
    method = tiny_em(mode="samplewise", max_rounds=2)
    out = method.protect(datamodule(cifar_root), tmp_path / "ems", progress=False)
    manifest, _, _, _ = check_export(out, cifar_root, 8)
    assert manifest["method"] == "em_samplewise"
    assert manifest["method_args"]["pgd_steps"] == 3
    assert [h["round"] for h in manifest["fit_info"]["history"]] == [1, 2]
    assert "round 2/2" in capsys.readouterr().out
    stats = method.evaluate_surrogate()
    # error-minimizing: the perturbed data is markedly easier for the surrogate than the clean one
    assert stats["perturbed_loss"] < 0.9 * stats["clean_loss"]
    assert stats["perturbed_acc"] > stats["clean_acc"]
    assert method.delta.abs().max() <= 8 / 255 + 1e-6


def test_em_unseen_images(cifar_root):
    dm = datamodule(cifar_root, train_subset=100)
    method = tiny_em(max_rounds=1, pgd_steps=2, unseen="zero")
    method.fit(dm)
    assert method.fit_info["fit_images"] == 100
    seen = dm.train_indices[:3]
    unseen = torch.tensor(sorted(set(range(N_TRAIN)) - set(dm.train_indices.tolist()))[:3])
    idx = torch.cat([seen, unseen])
    x = torch.full((6, 3, 32, 32), 0.5)
    y = torch.zeros(6, dtype=torch.long)
    delta = method.perturb_fn(x, y, idx)
    assert delta[:3].abs().amax(dim=(1, 2, 3)).min() > 0
    assert delta[3:].abs().max() == 0
    method.unseen = "pgd"
    delta = method.perturb_fn(x, y, idx)
    assert delta[3:].abs().amax(dim=(1, 2, 3)).min() > 0
    assert delta.abs().max() <= 8 / 255 + 1e-6


def test_cli_end_to_end_and_refuses_overwrite(cifar_root, tmp_path, capsys):
    out = tmp_path / "cli_ar"
    args = [
        "baseline",
        "--data", "CIFAR10DataModule",
        "--data.init_args.data_dir", str(cifar_root),
        "--method", "AutoregressivePerturbation",
        "--method.init_args.seed", "5",
        "--method.init_args.eps", "6",
        "--out", str(out),
        "--device", "cpu",
        "--no_progress",
    ]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method_args"] == {"eps": 6, "crop": 4, "max_crest": 5.0, "seed": 5}
    assert manifest["config"]["method"]["init_args"]["seed"] == 5
    check_export(out, cifar_root, 6)
    assert main(args) == 1
    assert str(out) in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    with pytest.raises(SystemExit) as exc:
        main(args[:-5])  # no --out
    assert exc.value.code != 0


def test_cli_em_config_file_with_overrides(cifar_root, tmp_path):
    out = tmp_path / "cli_em"
    args = [
        "baseline",
        "--config", str(CONFIGS / "em_classwise_cifar10.yaml"),
        "--data.init_args.data_dir", str(cifar_root),
        "--data.init_args.download", "false",
        "--method.init_args.arch", "fastnet",
        "--method.init_args.arch_kwargs", "{width: 0.25}",
        "--method.init_args.max_rounds", "1",
        "--method.init_args.pgd_steps", "1",
        "--method.init_args.train_steps", "2",
        "--data.init_args.train_subset", "50",
        "--out", str(out),
        "--device", "cpu",
        "--no_progress",
    ]
    assert main(args) == 0
    manifest = verify_manifest(out)
    assert manifest["method"] == "em_classwise"
    assert manifest["method_args"]["arch"] == "fastnet"
    assert manifest["method_args"]["device"] == "cpu"
    assert manifest["method_args"]["classwise_update"] == "sample_mean"
    assert manifest["method_args"]["grad_clip"] == 5.0
    # fitted on 50 images, the config's whole_training_set exports all 200; then only the 50
    _, diff, clean, labels = check_export(out, cifar_root, 8)
    inside = (clean.int() >= 8) & (clean.int() <= 247)  # where no image-range clip binds
    for k in range(10):
        rows = (labels == k).nonzero().reshape(-1)
        same = (diff[rows] == diff[rows[0]]) | ~inside[rows] | ~inside[rows[0]]
        assert same.all(), f"class {k}: its images do not share one pattern"
    assert main([*args, "--no_whole_training_set", "--overwrite"]) == 0
    assert verify_manifest(out)["num_images"] == 50


class Killed(Exception):
    """Stands in for a kill between two EM rounds."""


def test_em_resumes_after_a_kill_with_the_same_noise(cifar_root, tmp_path, monkeypatch):
    """Killed after round 1 and rerun with a larger max_rounds: rounds 2-3 run from the saved
    state, the noise is identical."""
    from fuse_lightning.baselines.em import load_state

    rounds_run: list[int] = []
    kill_after: list[int] = []

    def hook(self, round_, record):
        rounds_run.append(round_)
        if round_ in kill_after:
            kill_after.remove(round_)
            raise Killed

    monkeypatch.setattr(ErrorMinimizingNoise, "_on_round_end", hook)
    reference = tiny_em(max_rounds=3, augment=True)
    reference.protect(datamodule(cifar_root), tmp_path / "ref", progress=False)
    # stop_accuracy 1.01 is never met: the fit ends on max_rounds and keeps its state
    assert rounds_run == [1, 2, 3] and (tmp_path / "ref.em-state.pt").is_file()

    rounds_run.clear()
    kill_after.append(1)
    with pytest.raises(Killed):  # a smaller budget: raising it between the runs keeps the state
        tiny_em(max_rounds=2, augment=True).protect(datamodule(cifar_root), tmp_path / "run", progress=False)
    state_file = tmp_path / "run.em-state.pt"
    state = load_state(state_file)  # weights-only
    assert state["round"] == 1 and not (tmp_path / "run").exists()
    assert not list(tmp_path.glob(".run.em-state.pt.tmp*"))

    rerun = tiny_em(max_rounds=3, augment=True)
    out = rerun.protect(datamodule(cifar_root), tmp_path / "run", progress=False)
    assert rounds_run == [1, 2, 3]  # round 1 once, then 2 and 3 after the resume
    assert rerun.fit_info["resumed_after_round"] == 1
    # Tolerance: none. On CPU the resumed run is bitwise identical to the uninterrupted one.
    assert torch.equal(rerun.delta, reference.delta)
    assert [h["perturbed_acc"] for h in rerun.fit_info["history"]] == \
        [h["perturbed_acc"] for h in reference.fit_info["history"]]
    assert torch.equal(read_cifar(out, "cifar10", "train")[0], read_cifar(tmp_path / "ref", "cifar10", "train")[0])
    assert load_state(state_file)["round"] == 3  # kept (out of rounds), now after round 3


def test_em_out_of_rounds_keeps_its_state_and_continues_with_a_larger_budget(cifar_root, tmp_path, capsys):
    """A fit that ends on max_rounds short of its stop rule keeps the state beside the export;
    rerun with a larger max_rounds it runs only the new rounds and ends where a fit with that
    budget from the start ends. A converged fit deletes its state."""
    reference = tiny_em(max_rounds=2)  # stop_accuracy 1.01: never met, the budget ends it
    reference.protect(datamodule(cifar_root), tmp_path / "ref", progress=False)
    assert not reference.fit_info["converged"] and (tmp_path / "ref.em-state.pt").is_file()

    short = tiny_em(max_rounds=1)
    short.protect(datamodule(cifar_root), tmp_path / "run", progress=False)
    state_file = tmp_path / "run.em-state.pt"
    assert state_file.is_file() and "ran out of rounds" in capsys.readouterr().out
    longer = tiny_em(max_rounds=2)
    longer.protect(datamodule(cifar_root), tmp_path / "run", overwrite=True, progress=False)
    assert longer.fit_info["resumed_after_round"] == 1 and len(longer.fit_info["history"]) == 2
    assert torch.equal(longer.delta, reference.delta)

    done = tiny_em(max_rounds=1, stop_accuracy=0.0)  # met after round 1
    done.protect(datamodule(cifar_root), tmp_path / "done", progress=False)
    assert done.fit_info["converged"] and not (tmp_path / "done.em-state.pt").exists()

def test_em_state_of_other_settings_is_not_resumed(cifar_root, tmp_path, monkeypatch):
    from fuse_lightning.baselines.em import load_state

    rounds_run: list[int] = []

    def hook(self, round_, record):
        rounds_run.append(round_)
        if round_ == 1 and self.pgd_steps == 3:
            raise Killed

    monkeypatch.setattr(ErrorMinimizingNoise, "_on_round_end", hook)
    with pytest.raises(Killed):
        tiny_em(max_rounds=2).protect(datamodule(cifar_root), tmp_path / "x", progress=False,
                                      state_dir=tmp_path / "states")
    assert (tmp_path / "states" / "x.em-state.pt").is_file()
    method = tiny_em(max_rounds=2, pgd_steps=2)
    method.protect(datamodule(cifar_root), tmp_path / "x", progress=False, state_dir=tmp_path / "states")
    assert rounds_run == [1, 1, 2] and method.fit_info["resumed_after_round"] == 0
    assert load_state(tmp_path / "states" / "x.em-state.pt")["settings"]["pgd_steps"] == 2  # replaced
