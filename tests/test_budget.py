import pytest
import torch

from fuse_lightning import budget as bd

torch.set_num_threads(1)


def test_eps_and_perturb():
    assert bd.eps_to_unit(8) == pytest.approx(8 / 255)
    x = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(
        bd.perturb(x, torch.tensor([-0.1, 0.1, 0.1])), torch.tensor([0.0, 0.6, 1.0])
    )


def test_quantize_random_deltas_respect_budget():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (16, 3, 8, 8), generator=g, dtype=torch.uint8)
    delta = (torch.rand(clean.shape, generator=g) * 2 - 1) * (8.6 / 255)
    prot = bd.quantize_protected(clean, delta, 8)
    assert prot.dtype == torch.uint8 and prot.shape == clean.shape
    assert bd.linf_uint8(prot, clean) <= 8
    # inside the budget and away from [0, 255] edges the value is the rounded sum
    expected = torch.round(clean.double() + 255 * delta.double())
    inner = ((expected - clean.double()).abs() <= 8) & (expected >= 0) & (expected <= 255)
    assert inner.float().mean() > 0.8
    assert torch.equal(prot[inner].double(), expected[inner])


def test_quantize_adversarial_deltas():
    clean = torch.tensor([0, 1, 7, 128, 250, 255, 100, 100, 100], dtype=torch.uint8)
    delta = torch.tensor(
        [-1e30, 1e30, float("inf"), -float("inf"), 5.0, 1.0, float("nan"), 0.03, -0.03]
    )
    prot = bd.quantize_protected(clean, delta, 8.9)  # floor -> 8
    assert prot.tolist() == [0, 9, 15, 120, 255, 255, 100, 108, 92]
    assert bd.linf_uint8(prot, clean) <= 8
    assert bd.linf_uint8(bd.quantize_protected(clean, delta, 0), clean) == 0


def test_quantize_validation():
    clean = torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="shape"):
        bd.quantize_protected(clean, torch.zeros(3, 2), 8)
    with pytest.raises(ValueError, match="uint8"):
        bd.quantize_protected(clean.float(), torch.zeros(2, 3), 8)


def test_linf_uint8():
    a = torch.tensor([0, 255, 10], dtype=torch.uint8)
    b = torch.tensor([255, 0, 12], dtype=torch.uint8)
    assert bd.linf_uint8(a, b) == 255  # no uint8 wrap-around
    assert bd.linf_uint8(a[2:], b[2:]) == 2
