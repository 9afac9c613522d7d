"""Exact parameter counts: the torchvision baselines and the attention variants' arithmetic
(reference attention-blocks.md sections 4-5, all [arith] figures)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import create_model
from models.attention import ECA, GC, SKConv


def _count(arch: str, attention: str = "none", **kwargs: object) -> int:
    """Build on the meta device (no memory, no init cost) and count parameters."""
    with torch.device("meta"):
        model = create_model(arch, attention, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("arch", "attention", "expected"),
    [
        ("resnet18", "none", 11_689_512),
        ("resnet34", "none", 21_797_672),
        ("resnet50", "none", 25_557_032),
        ("resnet101", "none", 44_549_160),
        ("resnet50", "se", 28_088_024),
        ("resnet50", "cbam", 28_089_624),
        ("resnet50", "eca", 25_557_112),
        ("resnet50", "gc", 28_078_773),
        ("resnext50_32x4d", "none", 25_028_904),
        ("resnext50_32x4d", "sk", 27_479_784),
        # SE with biases, C // 16 hidden: the CBAM paper's params column (11.78 / 21.96 / 49.33 M).
        ("resnet18", "se", 11_778_592),
        ("resnet34", "se", 21_958_868),
        ("resnet101", "se", 49_326_872),
    ],
)
def test_exact_parameter_counts(arch: str, attention: str, expected: int) -> None:
    assert _count(arch, attention) == expected


def test_meta_count_equals_real_count() -> None:
    model = create_model("resnet18", "cbam")
    assert sum(p.numel() for p in model.parameters()) == _count("resnet18", "cbam")


def test_eca_adds_exactly_80_with_released_kernels_and_86_adaptive() -> None:
    base = _count("resnet50")
    assert _count("resnet50", "eca") - base == 80  # k3557: 3*3 + 4*5 + 6*5 + 3*7
    assert _count("resnet50", "eca", eca_kernels="adaptive") - base == 86  # formula: 5, 5, 5, 7
    assert _count("resnet50", "eca", eca_kernels=[3, 3, 3, 3]) - base == 48


@pytest.mark.parametrize(
    ("arch", "kernels"),
    [
        ("resnet18", (3, 5, 7, 7)),
        ("resnet34", (3, 3, 5, 7)),
        ("resnet50", (3, 5, 5, 7)),
        ("resnet101", (3, 3, 5, 7)),
        ("resnext50_32x4d", (5, 5, 5, 7)),  # adaptive formula on 256..2048 channels
        ("resnet_small", (3, 3, 5)),  # adaptive formula on 32, 64, 128 channels
    ],
)
def test_eca_kernel_per_stage(arch: str, kernels: tuple[int, ...]) -> None:
    with torch.device("meta"):
        model = create_model(arch, "eca")
    stages = [getattr(model, f"layer{i + 1}") for i in range(model.num_stages)]
    found = tuple({b.attn.kernel_size for b in stage} for stage in stages)
    assert found == tuple({k} for k in kernels)
    assert all(isinstance(b.attn, ECA) for stage in stages for b in stage)


def test_gc_on_all_stages_adds_2548000() -> None:
    base = _count("resnet50")
    assert _count("resnet50", "gc") - base == 2_521_741
    assert _count("resnet50", "gc", gc_stages=[1, 2, 3, 4]) - base == 2_548_000
    with torch.device("meta"):
        model = create_model("resnet50", "gc")
    assert all(isinstance(b.attn, nn.Identity) for b in model.layer1)
    assert all(
        isinstance(b.attn, GC) for layer in (2, 3, 4) for b in getattr(model, f"layer{layer}")
    )


def test_sknet50_is_resnext50_with_sk_units() -> None:
    assert _count("resnext50_32x4d", "sk") - _count("resnext50_32x4d") == 2_450_880
    with torch.device("meta"):
        model = create_model("resnext50_32x4d", "sk")
    first = model.layer1[0]
    assert isinstance(first.conv2, SKConv)
    assert isinstance(first.bn2, nn.Identity) and isinstance(first.act2, nn.Identity)
    assert isinstance(first.attn, nn.Identity)
    widths = [getattr(model, f"layer{i}")[0].conv2.out_channels for i in (1, 2, 3, 4)]
    assert widths == [128, 256, 512, 1024]


def test_resnet_small_is_small() -> None:
    # stem 3*3*32 + BN 64; stages (32, 64, 128) one BasicBlock each; fc 128 -> 10.
    assert _count("resnet_small") == 308_074
    for attention in ("se", "eca", "cbam", "gc", "coordatt", "sk"):
        assert _count("resnet_small", attention) < 1_000_000
