"""The layouts added for imported checkpoints: parameter counts against the reference code's
figures (counted there with 1000 classes), the layout details that change the numbers, and
attention capture / sites / summary map on the smaller members with every block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import capture_attention, create_model, list_sites, summary_map


def _count(arch: str, attention: str) -> int:
    with torch.device("meta"):
        model = create_model(arch, attention)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("arch", "attention", "expected"),
    [
        ("resnet50d", "eca", 25_576_350),  # timm ecaresnet50d
        ("resnet101d", "eca", 44_568_563),  # timm ecaresnet101d
        ("resnet50t", "eca", 25_573_814),  # timm ecaresnet50t
        ("resnet26t", "eca", 16_011_916),  # timm ecaresnet26t
        ("legacy_resnet50", "se", 28_088_024),  # timm legacy_seresnet50
        ("legacy_resnet18", "se", 11_778_592),  # timm legacy_seresnet18
        ("legacy_resnext50_32x4d", "se", 27_559_896),  # timm legacy_seresnext50_32x4d
        ("mobilenetv2", "coordatt", 3_950_648),  # official mbv2_ca
        ("mobilenetv2", "none", 3_504_872),  # MobileNetV2 1.0 (the paper's 3.4M, torchvision's)
        ("resnet152", "none", 60_192_808),  # torchvision resnet152
    ],
)
def test_parameter_counts_equal_the_reference(arch: str, attention: str, expected: int) -> None:
    assert _count(arch, attention) == expected


def test_caffe_layout_puts_the_stride_on_the_first_1x1_and_pools_without_padding() -> None:
    model = create_model("legacy_resnet50", "se")
    block = model.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    grouped = create_model("legacy_resnext50_32x4d", "se").layer2[0]
    assert grouped.conv1.stride == (1, 1) and grouped.conv2.stride == (2, 2)
    pool = model.maxpool
    assert isinstance(pool, nn.MaxPool2d) and pool.padding == 0 and pool.ceil_mode
    assert model.forward_features(torch.zeros(1, 3, 224, 224)).shape[-1] == 7
    basic = create_model("legacy_resnet18", "se").layer1[0]
    assert isinstance(basic.act_pre_attn, nn.ReLU)
    assert isinstance(create_model("resnet18", "se").layer1[0].act_pre_attn, nn.Identity)


def test_resnet_d_and_t_stems_and_average_pool_shortcut() -> None:
    d, t = create_model("resnet50d"), create_model("resnet26t")
    assert [m.out_channels for m in d.conv1 if isinstance(m, nn.Conv2d)] == [32, 32, 64]
    assert [m.out_channels for m in t.conv1 if isinstance(m, nn.Conv2d)] == [24, 32, 64]
    pool = d.layer2[0].downsample[0]
    assert isinstance(pool, nn.AvgPool2d) and pool.ceil_mode and not pool.count_include_pad
    assert isinstance(d.layer1[0].downsample[0], nn.Identity)  # stride 1: no pool
    assert d.layer2[0].downsample[1].stride == (1, 1)


def test_mobilenetv2_places_the_block_after_every_expanding_depthwise_conv() -> None:
    model = create_model("mobilenetv2", "coordatt")
    sites = [s.site for s in list_sites(model)]
    assert sites == [f"blocks.{i}.attn" for i in range(1, 17)]  # block 0 has t = 1
    assert model.blocks[1].attn.mip == 8 and model.blocks[16].attn.mip == 960 // 32
    with pytest.raises(ValueError, match="no place in mobilenetv2"):
        create_model("mobilenetv2", "sk")


@pytest.mark.parametrize(
    ("arch", "attention"),
    [
        (arch, block)
        for arch in ("resnet26t", "legacy_resnet18", "mobilenetv2")
        for block in ("se", "eca", "cbam", "gc", "coordatt", "sk")
        if (arch, block) != ("mobilenetv2", "sk")  # sk has no place there (tested above)
    ],
)
def test_capture_and_summary_on_the_new_layouts(arch: str, attention: str) -> None:
    model = create_model(arch, attention, num_classes=10).eval()
    x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = model(x)
        with capture_attention(model, derived=True) as cap:
            captured = model(x)
    assert torch.equal(plain, captured) and torch.isfinite(plain).all()
    assert {r.site for r in cap.records} == {s.site for s in list_sites(model)}
    summary = summary_map(cap.records, (48, 80))
    assert summary is not None and summary.shape == (2, 48, 80)
    assert 0 <= summary.min() <= summary.max() <= 1
