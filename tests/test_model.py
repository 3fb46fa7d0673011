"""Tests for segcore.model: shapes, gradients, size checks, widths and argument errors."""

from __future__ import annotations

import pytest
import torch

from segcore.model import ARCHS, UNet, UNet3Plus, build_model, count_parameters

# Tiny models on one thread keep the whole file fast on small CI machines.
torch.set_num_threads(1)

DEPTHS = range(1, 7)
TINY = {"base_width": 4, "max_width": 16}


def _model(arch: str, depth: int, in_channels: int = 3) -> torch.nn.Module:
    """Seeded tiny model with 3 classes."""
    torch.manual_seed(0)
    return build_model(arch, in_channels, 3, depth, **TINY)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shape_and_dtype(arch: str, depth: int, in_channels: int) -> None:
    model = _model(arch, depth, in_channels)
    y = model(torch.randn(2, in_channels, 64, 64))
    assert y.shape == (2, 3, 64, 64)
    assert y.dtype == torch.float32
    assert (model.depth, model.multiple) == (depth, 2**depth)
    assert (model.in_channels, model.num_classes) == (in_channels, 3)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_every_parameter_gets_gradient(arch: str, depth: int) -> None:
    model = _model(arch, depth)
    # Keep the bottleneck >= 2x2: with a 1x1 bottleneck and batch 2, training-mode BN sees two
    # values per channel, its output is ~constant and the bottom convs get ~zero gradient.
    size = max(64, 2 ** (depth + 1))
    model(torch.randn(2, 3, size, size)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no grad"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite grad"
        assert p.grad.abs().max() > 0, f"{name}: all-zero grad"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_non_square_input(arch: str, depth: int) -> None:
    y = _model(arch, depth)(torch.randn(2, 3, 64, 128))
    assert y.shape == (2, 3, 64, 128)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("depth", "h", "w"), [(1, 63, 64), (2, 64, 66), (4, 40, 40), (6, 96, 64), (6, 64, 32)]
)
def test_indivisible_size_rejected(arch: str, depth: int, h: int, w: int) -> None:
    model = _model(arch, depth)
    with pytest.raises(ValueError, match=rf"{h}x{w} is not divisible by 2\*\*depth = {2**depth}"):
        model(torch.randn(2, 3, h, w))


@pytest.mark.parametrize("cls", [UNet, UNet3Plus])
def test_widths_double_and_cap(cls: type) -> None:
    model = cls(3, 2, depth=4, base_width=8, max_width=32)
    assert model.widths == [8, 16, 32, 32, 32]
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_unet3plus_decoder_width() -> None:
    model = UNet3Plus(3, 2, depth=3, base_width=4, max_width=16)
    assert model.cat_width == 4
    assert model.node_width == 16  # (depth + 1) * cat_width
    assert model.head.in_channels == 16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "foo"}, r"arch: unknown architecture 'foo'; choose unet or unet3plus"),
        ({"depth": 0}, r"depth: must be an integer from 1 to 6, got 0"),
        ({"depth": 7}, r"depth: must be an integer from 1 to 6, got 7"),
        ({"depth": 2.0}, r"depth: must be an integer"),
        ({"base_width": 0}, r"base_width: must be an integer >= 1, got 0"),
        ({"in_channels": 0}, r"in_channels: "),
        ({"num_classes": 0}, r"num_classes: "),
        ({"max_width": 2}, r"max_width: must be >= base_width \(4\), got 2"),
    ],
)
def test_build_model_rejects_bad_args(kwargs: dict, match: str) -> None:
    args = {"arch": "unet", "in_channels": 3, "num_classes": 2, "depth": 3, **TINY, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(**args)


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_mode_is_deterministic(arch: str) -> None:
    model = _model(arch, 3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_and_channels_last(arch: str) -> None:
    model = _model(arch, 4).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.shape == (2, 3, 64, 64)
    # The size check must still fire under autocast + channels_last.
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="divisible"):
        model(torch.randn(2, 3, 72, 64).to(memory_format=torch.channels_last))
