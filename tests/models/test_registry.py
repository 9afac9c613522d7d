"""Registry, data config and the every-architecture x every-block forward/capture sweep."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
from torch import nn

from models import (
    ATTENTION_BLOCKS,
    DataConfig,
    capture_attention,
    create_model,
    list_models,
    list_sites,
    summary_map,
)
from models.attention import CBAM, SKConv
from models.data_config import IMAGENET_MEAN, IMAGENET_STD

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "resnet_small")
# Layouts of imported checkpoints; swept (smaller members) in test_import_layouts.py.
IMPORT_ARCHS = (
    "resnet152",
    "resnet26t",
    "resnet50d",
    "resnet50t",
    "resnet101d",
    "legacy_resnet18",
    "legacy_resnet34",
    "legacy_resnet50",
    "legacy_resnet101",
    "legacy_resnet152",
    "legacy_resnext50_32x4d",
    "mobilenetv2",
)
BLOCKS = ("none", "se", "eca", "cbam", "gc", "coordatt", "sk")
COMBINED = tuple(f"stn+{b}" for b in BLOCKS[1:])
# (kind, derived) recorded per site with derived=True, as in the contract's table.
EXPECTED_KINDS = {
    "se": {("channel", False), ("spatial", True)},
    "eca": {("channel", False), ("spatial", True)},
    "cbam": {("channel", False), ("spatial", False)},
    "gc": {("channel", False), ("context", False)},
    "coordatt": {("coord_h", False), ("coord_w", False), ("spatial", True)},
    "sk": {("branch", False), ("spatial", True)},
}


def test_list_models_and_blocks() -> None:
    assert list_models() == sorted(ARCHS + IMPORT_ARCHS)
    assert tuple(ATTENTION_BLOCKS) == (*BLOCKS, "stn", *COMBINED)


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: create_model("resnet5"), ARCHS),
        (lambda: create_model("resnet50", "senet"), BLOCKS),
        (lambda: create_model("resnet50", drop=0.1), ("attn_kwargs", "drop_rate", "gc_stages")),
        (lambda: create_model("resnet_small", width=[32]), ("depths", "widths")),
    ],
)
def test_unknown_names_list_the_valid_ones(call, names) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert all(repr(name) in str(info.value) for name in names)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attention": "se", "gc_stages": [2]}, "gc_stages applies only"),
        ({"attention": "gc", "gc_stages": [0, 5]}, "gc_stages must be"),
        ({"attention": "se", "eca_kernels": [3, 3, 3, 3]}, "eca_kernels applies only"),
        ({"attention": "eca", "eca_kernels": [3, 3]}, "eca_kernels must be"),
        ({"attention": "eca", "eca_kernels": [3, 4, 5, 7]}, "odd"),
        ({"attention": "eca", "attn_kwargs": {"kernel_size": 3}}, "eca_kernels"),
        ({"num_classes": 0}, "num_classes"),
        ({"in_chans": 2.5}, "in_chans"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"num_classes": 3, "labels": ["a", "b"]}, "2 labels"),
        ({"num_classes": 3, "labels": "abc"}, "labels must be"),
        ({"attn_kwargs": {"reduction": 8}}, "attention='none'"),
    ],
)
def test_invalid_options_raise_value_error(kwargs: dict, match: str) -> None:
    with torch.device("meta"), pytest.raises(ValueError, match=match):
        create_model("resnet18", **kwargs)


def test_imagenet_model_attributes_and_default_data_config() -> None:
    with torch.device("meta"):
        model = create_model("resnet50", "cbam")
    assert (model.arch, model.attention, model.model_kwargs) == ("resnet50", "cbam", {})
    config = model.data_config
    assert config.input_size == (3, 224, 224)
    assert (config.mean, config.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert (config.interpolation, config.crop_pct) == ("bilinear", 0.875)
    assert config.labels == tuple(f"class_{i}" for i in range(1000))


def test_resnet_small_defaults() -> None:
    model = create_model("resnet_small").eval()
    config = model.data_config
    assert (model.num_classes, model.in_chans) == (10, 1)
    assert config.input_size == (1, 64, 64)
    assert (config.mean, config.std, config.crop_pct) == ((0.5,), (0.5,), 1.0)
    assert config.labels == tuple(str(i) for i in range(10))
    with torch.inference_mode():
        features = model.forward_features(torch.zeros(1, 1, 64, 64))
    assert features.shape == (1, 128, 8, 8)


def test_data_config_and_label_overrides() -> None:
    custom = DataConfig((1, 32, 32), (0.13,), (0.31,), "nearest", 1.0, ("a", "b", "c"))
    model = create_model("resnet_small", num_classes=3, data_config=custom)
    assert model.data_config == custom
    model = create_model(
        "resnet_small", num_classes=3, data_config=custom.to_dict(), labels=list("xyz")
    )
    assert model.data_config == DataConfig(
        (1, 32, 32), (0.13,), (0.31,), "nearest", 1.0, ("x", "y", "z")
    )
    model = create_model("resnet_small", num_classes=2, labels=["cat", "dog"])
    assert model.data_config.labels == ("cat", "dog")
    with pytest.raises(ValueError, match="3 input channels but the model takes 1"):
        create_model("resnet_small", data_config=DataConfig((3, 8, 8), (0,) * 3, (1,) * 3))


def test_model_kwargs_rebuild_the_same_network() -> None:
    options = {"widths": (32, 64), "depths": (2, 1), "gc_stages": (1, 2), "drop_rate": 0.1}
    model = create_model("resnet_small", "gc", num_classes=4, in_chans=3, **options)
    assert model.model_kwargs == json.loads(json.dumps(options))
    again = create_model("resnet_small", "gc", 4, 3, **model.model_kwargs)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}
    assert again.model_kwargs == model.model_kwargs


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"input_size": (3, 224), "mean": (0,) * 3, "std": (1,) * 3}, "input_size"),
        ({"input_size": (3, 8, 8), "mean": (0,), "std": (1,) * 3}, "mean"),
        ({"input_size": (1, 8, 8), "mean": (0,), "std": (0,)}, "positive"),
        ({"input_size": (1, 8, 8), "mean": (0,), "std": (1,), "interpolation": "area"}, "bicubic"),
        ({"input_size": (1, 8, 8), "mean": (0,), "std": (1,), "crop_pct": 1.5}, "crop_pct"),
        ({"input_size": (1, 8, 8), "mean": (0,), "std": (1,), "labels": [1, 2]}, "strings"),
        ({"input_size": (1, 8, 8), "mean": (0,), "std": (1,), "size": 3}, "unknown"),
        ({"input_size": (1, 8, 8), "mean": (0,)}, "missing"),
    ],
)
def test_data_config_validation(data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataConfig.from_dict(data)


def test_data_config_json_round_trip() -> None:
    config = DataConfig([3, 224, 200], [0.1, 0.2, 0.3], [1, 2, 3], "bicubic", 0.9, ["a"])
    assert config.input_size == (3, 224, 200) and config.std == (1.0, 2.0, 3.0)
    assert DataConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_attention_sits_after_last_bn_before_the_addition() -> None:
    model = create_model("resnet_small", "cbam").eval()
    block = model.layer2[0]
    seen: dict[str, torch.Tensor] = {}
    block.bn2.register_forward_hook(lambda m, a, out: seen.setdefault("bn2", out.clone()))
    block.attn.register_forward_hook(lambda m, a, out: seen.update(attn_in=a[0], attn_out=out))
    block.downsample.register_forward_hook(lambda m, a, out: seen.setdefault("short", out))
    block.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    with torch.inference_mode():
        model(torch.randn(1, 1, 40, 56))
    assert torch.equal(seen["attn_in"], seen["bn2"])
    assert torch.equal(seen["out"], torch.relu(seen["attn_out"] + seen["short"]))
    assert all(isinstance(getattr(model, f"layer{i}")[0].attn, CBAM) for i in (1, 2, 3))


def test_sk_replaces_the_strided_conv_of_basic_blocks() -> None:
    with torch.device("meta"):
        model = create_model("resnet18", "sk")
    block = model.layer2[0]
    assert isinstance(block.conv1, SKConv) and isinstance(block.conv2, nn.Conv2d)
    assert isinstance(block.bn1, nn.Identity) and isinstance(block.act1, nn.Identity)
    assert block.conv1.branches[0][0].stride == (2, 2)
    sites = [s.site for s in list_sites(model)]
    assert sites[:3] == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"]


def test_generic_init_keeps_the_blocks_own_inits() -> None:
    cbam = create_model("resnet_small", "cbam")
    assert all(torch.all(m.spatial_bn.weight == 0) for m in cbam.modules() if isinstance(m, CBAM))
    gc = create_model("resnet_small", "gc").eval()
    block = gc.layer2[0].attn
    x = torch.randn(2, block_channels(block), 5, 7)
    with torch.inference_mode():
        assert torch.equal(block(x), x)  # last conv zero-initialised: identity at start
    conv = create_model("resnet50").conv1.weight
    assert abs(conv.std().item() - (2 / (64 * 49)) ** 0.5) < 0.002  # kaiming fan_out


def block_channels(block: nn.Module) -> int:
    return next(m for m in block.modules() if isinstance(m, nn.Conv2d)).in_channels


_MODELS: dict[tuple[str, str], nn.Module] = {}


def _model(arch: str, attention: str) -> nn.Module:
    """One model per (arch, block), shared by the batch-size cases; 10 classes keep fc small."""
    key = (arch, attention)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = create_model(arch, attention, num_classes=10).eval()
    return _MODELS[key]


def _expected_sites(model: nn.Module, attention: str) -> list[str]:
    names = []
    for i in range(model.num_stages):
        if attention == "gc" and i == 0:
            continue
        for j, block in enumerate(getattr(model, f"layer{i + 1}")):
            leaf = "attn"
            if attention == "sk":
                leaf = "conv2" if hasattr(block, "conv3") else "conv1"
            names.append(f"layer{i + 1}.{j}.{leaf}")
    return names


def _check_record(record, out_shape: torch.Size) -> None:
    n, c, h, w = out_shape
    expected = {
        "channel": (n, c),
        "spatial": (n, 1, h, w),
        "context": (n, 1, h, w),
        "coord_h": (n, c, h, 1),
        "coord_w": (n, c, 1, w),
        "branch": (n, 2, c),
    }[record.kind]
    tensor = record.tensor
    assert tuple(tensor.shape) == expected, (record.site, record.kind)
    assert tensor.dtype == torch.float32 and not tensor.requires_grad
    assert torch.isfinite(tensor).all()
    if record.kind == "spatial" or (record.kind == "channel" and record.block != "gc"):
        assert tensor.min() >= 0 and tensor.max() <= 1
    if record.kind == "context":
        torch.testing.assert_close(tensor.sum((2, 3)), torch.ones(n, 1))
    if record.kind == "branch":
        torch.testing.assert_close(tensor.sum(1), torch.ones(n, c))


@pytest.mark.parametrize("shape", [(1, 64, 64), (2, 48, 80)], ids=["1x64x64", "2x48x80"])
@pytest.mark.parametrize("attention", BLOCKS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_with_every_block(arch: str, attention: str, shape: tuple) -> None:
    model = _model(arch, attention)
    x = torch.randn(
        shape[0], model.in_chans, *shape[1:], generator=torch.Generator().manual_seed(0)
    )
    sites = _expected_sites(model, attention) if attention != "none" else []
    assert [s.site for s in list_sites(model, derived=True)] == sites
    out_shapes: dict[str, torch.Size] = {}
    hooks = [
        model.get_submodule(site).register_forward_hook(
            lambda m, a, out, site=site: out_shapes.__setitem__(site, out.shape)
        )
        for site in sites
    ]
    with torch.inference_mode():
        logits = model(x)
        with capture_attention(model, derived=True) as cap:
            captured = model(x)
    for hook in hooks:
        hook.remove()
    assert logits.shape == (shape[0], 10) and torch.isfinite(logits).all()
    assert torch.equal(logits, captured)
    by_site: dict[str, set] = defaultdict(set)
    for record in cap.records:
        assert record.block == attention
        by_site[record.site].add((record.kind, record.derived))
        _check_record(record, out_shapes[record.site])
    assert list(by_site) == sites
    assert all(kinds == EXPECTED_KINDS[attention] for kinds in by_site.values())
    summary = summary_map(cap.records, shape[1:])
    if attention == "none":
        assert summary is None
    else:
        assert summary.shape == shape and 0 <= summary.min() <= summary.max() <= 1
