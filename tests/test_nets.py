"""Tests for the plain classifier and generator networks."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from torch import nn

from fuse_lightning.nets import (
    ClassifierName,
    EncoderDecoderGenerator,
    GeneratorName,
    UNetGenerator,
    available_classifiers,
    available_generators,
    build_classifier,
    build_generator,
)

TORCHVISION_ARCHS = ["resnet18", "resnet50", "vgg16_bn", "densenet121", "mobilenet_v2", "vit_small"]
ALL_ARCHS = TORCHVISION_ARCHS + ["wrn16_4", "wrn28_10", "fastnet"]


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_all_archs() -> None:
    assert sorted(ALL_ARCHS) == available_classifiers()
    assert available_generators() == ["encdec", "unet"]
    # The Literal types of the constructors' arch arguments name exactly the registry's entries.
    assert sorted(get_args(ClassifierName)) == available_classifiers()
    assert sorted(get_args(GeneratorName)) == available_generators()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_classifier_forward_32(arch: str) -> None:
    torch.manual_seed(0)
    # train mode: untrained BatchNorm running stats make eval-mode activations vanish in deep nets
    model = build_classifier(arch, num_classes=7, image_size=32).train()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()
    if arch != "vit_small":  # torchvision zero-initializes the ViT head
        assert not torch.allclose(y[0], y[1])  # the output depends on the input


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_classifier_forward_64(arch: str) -> None:
    model = build_classifier(arch, num_classes=5, image_size=64).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 5)
    assert torch.isfinite(y).all()


def test_resnet18_stems() -> None:
    small = build_classifier("resnet18", 10, image_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    large = build_classifier("resnet18", 10, image_size=224).eval()
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        assert large(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_narrow_resnet18() -> None:
    full, narrow = build_classifier("resnet18", 10), build_classifier("resnet18", 10, width=16, in_channels=1)
    # Parameters scale with the square of the width: 16 of 64 channels gives ~1/16.
    assert 0.05 < _n_params(narrow) / _n_params(full) < 0.07
    convs = [m for m in narrow.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].stride == (1, 1) and convs[0].in_channels == 1  # the CIFAR stem
    assert sum(1 for c in convs if c.kernel_size == (3, 3)) == 17  # stem + 8 blocks x 2
    assert max(c.out_channels for c in convs) == 128
    with torch.no_grad():
        assert narrow.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="small images"):
        build_classifier("resnet18", 10, image_size=224, width=16)


def test_narrow_vgg16_bn() -> None:
    full, narrow = build_classifier("vgg16_bn", 10), build_classifier("vgg16_bn", 10, width=0.25, in_channels=1)
    assert 0.05 < _n_params(narrow) / _n_params(full) < 0.07  # a quarter of the channels: ~1/16
    convs = [m for m in narrow.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and [convs[0].in_channels, convs[0].out_channels, convs[-1].out_channels] == [1, 16, 128]
    with torch.no_grad():
        assert narrow.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="small images"):
        build_classifier("vgg16_bn", 10, image_size=224, width=0.25)


def test_small_image_variants() -> None:
    vgg = build_classifier("vgg16_bn", 10, image_size=32)
    assert _n_params(vgg) < 20e6  # no 7x7x512 -> 4096 classifier
    mnv2 = build_classifier("mobilenet_v2", 10, image_size=32)
    assert mnv2.features[0][0].stride == (1, 1)
    assert mnv2.features[2].conv[1][0].stride == (1, 1)
    dn = build_classifier("densenet121", 10, image_size=32)
    assert dn.features.conv0.kernel_size == (3, 3)
    assert isinstance(dn.features.pool0, nn.Identity)
    assert 2.5e6 < _n_params(build_classifier("wrn16_4", 10)) < 3e6


def test_in_channels_and_kwargs() -> None:
    for arch in ("resnet18", "fastnet", "wrn16_4"):
        model = build_classifier(arch, 4, image_size=32, in_channels=1).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    narrow = build_classifier("fastnet", 10, width=0.5)
    assert _n_params(narrow) < 0.4 * _n_params(build_classifier("fastnet", 10))


def test_unknown_classifier_lists_choices() -> None:
    with pytest.raises(ValueError, match="resnet18.*") as err:
        build_classifier("resnet1000", 10)
    for name in available_classifiers():
        assert name in str(err.value)


def test_vit_patch_divisibility_error() -> None:
    with pytest.raises(ValueError, match="divisible"):
        build_classifier("vit_small", 10, image_size=30)


def test_fastnet_learns_colour_task() -> None:
    """30 SGD steps separate 'reddish' from 'bluish' noisy images."""
    g = torch.Generator().manual_seed(0)
    n = 64
    labels = torch.arange(n) % 2
    base = torch.tensor([[0.8, 0.2, 0.2], [0.2, 0.2, 0.8]])[labels]  # (n, 3)
    x = base[:, :, None, None] + 0.25 * torch.randn(n, 3, 16, 16, generator=g)
    x = (x - 0.5) / 0.25  # normalized, as the classifiers expect
    torch.manual_seed(0)
    model = build_classifier("fastnet", num_classes=2, image_size=16, width=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for step in range(30):
        idx = torch.arange(32) + 32 * (step % 2)
        loss = nn.functional.cross_entropy(model(x[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == labels).float().mean().item()
    assert acc > 0.9


@pytest.mark.parametrize("arch", ["encdec", "unet"])
@pytest.mark.parametrize(
    "shape", [(2, 3, 32, 32), (2, 3, 64, 64), (2, 3, 36, 44), (1, 3, 224, 224)]
)
def test_generator_shapes(arch: str, shape: tuple[int, ...]) -> None:
    gen = build_generator(arch)
    with torch.no_grad():
        y = gen(torch.rand(shape))
    assert y.shape == shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("arch", ["encdec", "unet"])
def test_generator_odd_size_and_small_init(arch: str) -> None:
    torch.manual_seed(0)
    gen = build_generator(arch)
    x = torch.rand(2, 3, 33, 27)
    with torch.no_grad():
        y = gen(x)
    assert y.shape == x.shape
    # small-but-nonzero initial output, so eps * tanh(y) starts in the linear range
    assert 0 < y.abs().max() < 1.0


@pytest.mark.parametrize("arch", ["encdec", "unet"])
def test_generator_gradients_reach_all_params(arch: str) -> None:
    torch.manual_seed(0)
    gen = build_generator(arch)
    x = torch.rand(2, 3, 32, 32)
    target = torch.randn(2, 3, 32, 32)
    loss = (gen(x) * target).sum()
    loss.backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_generator_param_counts_and_types() -> None:
    encdec = build_generator("encdec", base_width=32)
    unet = build_generator("unet", base_width=32)
    assert isinstance(encdec, EncoderDecoderGenerator)
    assert isinstance(unet, UNetGenerator)
    assert 0.2e6 < _n_params(encdec) < 0.45e6
    assert 0.6e6 < _n_params(unet) < 1.5e6
    assert _n_params(build_generator("unet", base_width=16)) < _n_params(unet) / 3


def test_generator_is_sample_wise() -> None:
    """GroupNorm: a sample's output does not depend on the rest of the batch (train mode)."""
    torch.manual_seed(0)
    gen = build_generator("encdec").train()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        full = gen(x)
        single = gen(x[:1])
    torch.testing.assert_close(full[:1], single, rtol=1e-4, atol=1e-6)


def test_unknown_generator_lists_choices() -> None:
    with pytest.raises(ValueError, match="encdec.*unet"):
        build_generator("gan")


def test_output_code_makes_the_initial_delta_a_classwise_code() -> None:
    """With an output code, the untrained generator's delta is mostly its class's code: images of
    one class share it, classes differ (code rank near its maximum)."""
    from fuse_lightning.codes import class_share, code_rank
    from fuse_lightning.nets.conditioned import ConditionedGenerator

    torch.manual_seed(0)
    gen = ConditionedGenerator("encdec", num_classes=5, base_width=8, embed_dim=4, output_code_size=16)
    x, y = torch.rand(40, 3, 16, 16), torch.arange(5).repeat_interleave(8)
    with torch.no_grad():
        delta = torch.tanh(gen(x, y))
    assert class_share(delta, y) > 0.8
    assert code_rank(delta, y) > 3.0  # of at most 4
    plain = ConditionedGenerator("encdec", num_classes=5, base_width=8, embed_dim=4)
    with torch.no_grad():
        assert class_share(torch.tanh(plain(x, y)), y) < class_share(delta, y)
    with pytest.raises(ValueError, match="labels"):
        gen(x)
    with pytest.raises(ValueError, match="output_code_size"):
        ConditionedGenerator("encdec", output_code_size=-1)


def test_fixed_output_codes_are_saved_but_not_trained() -> None:
    """`output_code_trainable=False`: the codes are a buffer (in the state dict, not among the
    parameters an optimizer sees) and an optimizer step leaves them exactly as drawn."""
    from fuse_lightning.nets.conditioned import ConditionedGenerator

    torch.manual_seed(0)
    gen = ConditionedGenerator("encdec", num_classes=3, base_width=8, embed_dim=0, output_code_size=4,
                               output_code_trainable=False)
    assert "output_codes" in gen.state_dict()
    assert all(p is not gen.output_codes for p in gen.parameters())
    before = gen.output_codes.clone()
    opt = torch.optim.SGD(gen.parameters(), lr=1.0)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    gen(x, y).square().mean().backward()
    opt.step()
    assert torch.equal(gen.output_codes, before)
    learned = ConditionedGenerator("encdec", num_classes=3, base_width=8, embed_dim=0, output_code_size=4)
    start = learned.output_codes.detach().clone()
    opt = torch.optim.SGD(learned.parameters(), lr=1.0)
    learned(x, y).square().mean().backward()
    opt.step()
    assert not torch.equal(learned.output_codes, start)
