"""`attnserve import`: every source format and layout, from fixtures in the sources' own key names.

For each: import, load the package strictly, and compare its logits with those of the same
weights put by hand (the renames written out here, independently of models.imports) into the
project's model; every source tensor must reach the package unchanged, and the source's
preprocessing and labels must land in the card. Then the bad inputs: each is a clear error and
leaves no package behind.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from import_fixtures import (
    mbv2_ca_keys,
    random_state,
    resnet_keys,
    senet_keys,
    write_checkpoint,
    write_hub_dir,
)

from models import create_model
from models.data import imagenet_classes
from models.imports import ImportFailed, import_source
from models.imports.command import register
from models.package import load_package


def _sub(*pairs: tuple[str, str]) -> Callable[[str], str]:
    def rename(key: str) -> str:
        for pattern, repl in pairs:
            key = re.sub(pattern, repl, key)
        return key

    return rename


def _mbv2_by_hand(key: str) -> str:
    fixed = {"features.0.0": "conv_stem", "features.0.1": "bn1", "conv.0": "conv_head"}
    fixed |= {"conv.1": "bn2", "classifier.1": "classifier"}
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    index, j, rest = re.fullmatch(r"features\.(\d+)\.conv\.(\d+)\.(.*)", key).groups()
    if index == "1":  # the t = 1 block: dw, bn, pw-linear, bn
        name = {"0": "conv_dw", "1": "bn2", "3": "conv_pwl", "4": "bn3"}[j]
    else:
        names = {"0": "conv_pw", "1": "bn1", "3": "conv_dw", "4": "bn2", "6": "attn"}
        name = (names | {"7": "conv_pwl", "8": "bn3"})[j]
        head, _, tail = rest.partition(".")
        if name == "attn":  # mbv2_ca.py's CoordAtt calls the h/w convs conv2/conv3
            rest = {"conv2": "conv_h", "conv3": "conv_w"}.get(head, head) + "." + tail
    return f"blocks.{int(index) - 1}.{name}.{rest}"


@dataclass
class Case:
    """One source: its keys, how it is written, what it must become, the rename by hand."""

    keys: Callable[[], dict[str, tuple[int, ...]]]
    write: Callable[[Path, dict[str, torch.Tensor]], Path]
    arch: str
    attention: str
    layout: str
    by_hand: Callable[[str], str] = lambda key: key
    kwargs: dict[str, Any] = field(default_factory=dict)
    hub: bool = False


_TIMM = "timm / torchvision ResNet"
CASES = {
    "torchvision-resnet18-pth": Case(
        lambda: resnet_keys("basic", (2, 2, 2, 2), counters=False),  # pre-1.0 file: no counters
        lambda d, s: write_checkpoint(d / "resnet18-f37072fd.pth", s),
        "resnet18",
        "none",
        _TIMM,
    ),
    "torchvision-resnet18-safetensors": Case(
        lambda: resnet_keys("basic", (2, 2, 2, 2)),
        lambda d, s: write_checkpoint(d / "resnet18.safetensors", s),
        "resnet18",
        "none",
        _TIMM,
    ),
    "timm-seresnet50-hub": Case(
        lambda: resnet_keys("bottleneck", (3, 4, 6, 3), attn="se"),
        lambda d, s: write_hub_dir(d / "seresnet50.a1_in1k", s, "seresnet50"),
        "resnet50",
        "se",
        _TIMM,
        _sub((r"\.se\.", ".attn.")),
        hub=True,
    ),
    "timm-ecaresnet26t-hub-bin": Case(
        lambda: resnet_keys(
            "bottleneck", (2, 2, 2, 2), stem="deep_tiered", avg_down=True, attn="eca"
        ),
        lambda d, s: write_hub_dir(
            d / "ecaresnet26t.ra2_in1k",
            s,
            "ecaresnet26t",
            weights="pytorch_model.bin",
            pretrained_cfg={"input_size": [3, 256, 256], "crop_pct": 0.95},
        ),
        "resnet26t",
        "eca",
        _TIMM,
        _sub((r"\.se\.", ".attn.")),
        {"eca_kernels": [5, 5, 5, 7]},
        hub=True,
    ),
    "timm-legacy_seresnet18-hub": Case(
        lambda: senet_keys("basic", (2, 2, 2, 2)),
        lambda d, s: write_hub_dir(d / "legacy_seresnet18.in1k", s, "legacy_seresnet18"),
        "legacy_resnet18",
        "se",
        "SENet Caffe layout (timm legacy_*, pretrainedmodels)",
        _sub(("^layer0.", ""), (r"\.se_module\.", ".attn."), ("^last_linear", "fc")),
        hub=True,
    ),
    "pretrainedmodels-se_resnet50-pth": Case(
        lambda: senet_keys("bottleneck", (3, 4, 6, 3), counters=False),
        lambda d, s: write_checkpoint(d / "se_resnet50-ce0d4300.pth", s),
        "legacy_resnet50",
        "se",
        "SENet Caffe layout (timm legacy_*, pretrainedmodels)",
        _sub(("^layer0.", ""), (r"\.se_module\.", ".attn."), ("^last_linear", "fc")),
    ),
    "timm-skresnext50-hub": Case(
        lambda: resnet_keys("bottleneck", (3, 4, 6, 3), groups=32, base_width=4, sk=True),
        lambda d, s: write_hub_dir(d / "skresnext50_32x4d.ra_in1k", s, "skresnext50_32x4d"),
        "resnext50_32x4d",
        "sk",
        "timm SK-ResNeXt",
        _sub(
            (r"conv1\.conv\.", "conv1."),
            (r"conv1\.bn\.", "bn1."),
            (r"paths\.(\d)\.conv\.", r"branches.\1.0."),
            (r"paths\.(\d)\.bn\.", r"branches.\1.1."),
            (r"attn\.fc_reduce\.", "fc1.0."),
            (r"attn\.bn\.", "fc1.1."),
            (r"attn\.fc_select\.", "fc2."),
            (r"conv3\.conv\.", "conv3."),
            (r"conv3\.bn\.", "bn3."),
        ),
        hub=True,
    ),
    "official-eca_resnet18-pth-tar": Case(
        lambda: resnet_keys(
            "basic", (2, 2, 2, 2), attn="eca", attn_name="eca", eca_kernels=(3, 5, 7, 7)
        ),
        lambda d, s: write_checkpoint(d / "eca_resnet18_k3577.pth.tar", s, wrap="train"),
        "resnet18",
        "eca",
        "official ECA-Net ResNet",
        _sub((r"\.eca\.", ".attn.")),
        {"eca_kernels": [3, 5, 7, 7]},
    ),
    "official-cbam_resnet50-pth-tar": Case(
        lambda: resnet_keys("bottleneck", (3, 4, 6, 3), attn="cbam", attn_name="cbam"),
        lambda d, s: write_checkpoint(d / "RESNET50_CBAM_new_name_wrap.pth.tar", s, wrap="train"),
        "resnet50",
        "cbam",
        "official CBAM ResNet",
        _sub(
            (r"cbam\.ChannelGate\.mlp\.1", "attn.mlp.0"),
            (r"cbam\.ChannelGate\.mlp\.3", "attn.mlp.2"),
            (r"cbam\.SpatialGate\.spatial\.conv", "attn.spatial_conv"),
            (r"cbam\.SpatialGate\.spatial\.bn", "attn.spatial_bn"),
        ),
    ),
    "official-mbv2_ca-pth": Case(
        mbv2_ca_keys,
        lambda d, s: write_checkpoint(d / "mbv2_ca.pth", s),
        "mobilenetv2",
        "coordatt",
        "official MobileNetV2 + Coordinate Attention (mbv2_ca)",
        _mbv2_by_hand,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_import_equals_the_weights_loaded_by_hand(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    source_state = random_state(case.keys(), seed=len(name))
    source = case.write(tmp_path / "src", source_state)
    card = import_source(source, tmp_path / "pkg")
    model, loaded = load_package(tmp_path / "pkg")  # strict: every tensor, exact shapes
    assert (loaded.arch, loaded.attention, loaded.model_kwargs) == (
        case.arch,
        case.attention,
        case.kwargs,
    )
    assert card.training["import"]["layout"] == case.layout
    # Every source tensor reaches the package unchanged, under the name written out by hand.
    package = safetensors.torch.load_file(tmp_path / "pkg" / "model.safetensors")
    renamed = {case.by_hand(k): v for k, v in source_state.items()}
    assert len(renamed) == len(source_state)
    assert set(renamed) <= set(package)
    assert all(k.endswith("num_batches_tracked") for k in set(package) - set(renamed))
    assert all(torch.equal(package[k], v) for k, v in renamed.items())
    # The same weights loaded by hand give the same logits.
    by_hand = create_model(case.arch, case.attention, **case.kwargs).eval()
    result = by_hand.load_state_dict(renamed, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = model(x)
        torch.testing.assert_close(logits, by_hand(x), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logits).all() and logits.std() > 0
    # Preprocessing and labels in the card.
    config = loaded.data_config
    assert config.labels == imagenet_classes() and config.labels[281] == "tabby"
    assert card.training["import"]["labels"] == "imagenet-1k"
    if case.hub:
        assert (config.interpolation, config.crop_pct) == ("bicubic", 0.95)
        size = 256 if "26t" in name else 224
        assert config.input_size == (3, size, size)
    else:  # torchvision / official: resize 256, centre crop 224, bilinear, ImageNet mean/std
        assert (config.input_size, config.interpolation, config.crop_pct) == (
            (3, 224, 224),
            "bilinear",
            0.875,
        )
        assert config.mean == (0.485, 0.456, 0.406) and config.std == (0.229, 0.224, 0.225)


def test_labels_from_a_file_and_from_the_config(tmp_path: Path) -> None:
    state = random_state(resnet_keys("basic", (2, 2, 2, 2), num_classes=3))
    source = write_checkpoint(tmp_path / "pets.pth", state)
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n\n")
    card = import_source(source, tmp_path / "a", labels_file=tmp_path / "labels.txt")
    assert card.data_config.labels == ("cat", "dog", "bird")
    hub = write_hub_dir(tmp_path / "hub", state, "resnet18", label_names=["n1", "n2", "n3"])
    config = json.loads((hub / "config.json").read_text())
    config["label_descriptions"] = {"n1": "cat", "n3": "bird"}
    (hub / "config.json").write_text(json.dumps(config))
    card = import_source(hub, tmp_path / "b", name="pets")
    assert card.name == "pets" and card.data_config.labels == ("cat", "n2", "bird")
    card = import_source(source, tmp_path / "c")
    assert card.data_config.labels == ("class_0", "class_1", "class_2")


def _bad_shape(state: dict[str, torch.Tensor]) -> None:
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)


def _missing(state: dict[str, torch.Tensor]) -> None:
    del state["layer3.1.bn2.running_var"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            _bad_shape,
            r"layer1\.0\.conv1\.weight: checkpoint \(64, 64, 1, 1\), model \(64, 64, 3, 3\)",
        ),
        (_missing, r"1 missing keys, e\.g\. \['layer3\.1\.bn2\.running_var'\]"),
    ],
)
def test_weights_that_do_not_fit_name_the_keys_and_the_layouts_tried(
    change: Callable[[dict[str, torch.Tensor]], None], message: str, tmp_path: Path
) -> None:
    state = random_state(resnet_keys("basic", (2, 2, 2, 2)))
    change(state)
    source = write_checkpoint(tmp_path / "resnet18.pth", state)
    with pytest.raises(ImportFailed) as info:
        import_source(source, tmp_path / "pkg")
    text = str(info.value)
    assert re.search(message, text), text
    assert "resnet18 + none" in text and "Layouts tried" in text
    for layout in ("SENet Caffe layout", "official CBAM ResNet", "mbv2_ca"):
        assert layout in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet18.pth"]


class NotATensor:
    """A class a weights-only unpickler must refuse to build."""


def test_a_pickle_needing_arbitrary_classes_is_refused(tmp_path: Path) -> None:
    torch.save(
        {"state_dict": {"fc.weight": torch.zeros(2, 2)}, "extra": NotATensor()}, tmp_path / "x.pth"
    )
    with pytest.raises(ImportFailed, match=r"refused: .*NotATensor.*weights_only=True"):
        import_source(tmp_path / "x.pth", tmp_path / "pkg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pth"]


def test_an_unknown_architecture_in_config_json_is_named(tmp_path: Path) -> None:
    state = random_state(resnet_keys("basic", (2, 2, 2, 2)))
    hub = write_hub_dir(tmp_path / "vit", state, "vit_base_patch16_224")
    with pytest.raises(
        ImportFailed,
        match=r"unknown architecture 'vit_base_patch16_224' in config\.json; supported .*'seresnet",
    ):
        import_source(hub, tmp_path / "pkg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit"]


def test_existing_output_and_wrong_label_count_are_refused(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "r.pth", random_state(resnet_keys("basic", (2, 2, 2, 2))))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "card.json").write_text("{}")
    with pytest.raises(ImportFailed, match="not an empty directory"):
        import_source(source, tmp_path / "full")
    (tmp_path / "labels.txt").write_text("a\nb\n")
    with pytest.raises(ImportFailed, match="has 2 labels, the weights 1000 classes"):
        import_source(source, tmp_path / "pkg", labels_file=tmp_path / "labels.txt")
    assert not (tmp_path / "pkg").exists()


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    source = write_checkpoint(tmp_path / "mbv2_ca.pth", random_state(mbv2_ca_keys()))
    args = parser.parse_args(
        ["import", str(source), "--out", str(tmp_path / "ca"), "--name", "mbv2-ca"]
    )
    assert args.func(args) == 0
    assert "mobilenetv2 + coordatt" in capsys.readouterr().out
    assert load_package(tmp_path / "ca")[1].name == "mbv2-ca"
    args = parser.parse_args(
        ["import", str(tmp_path / "nothing.pth"), "--out", str(tmp_path / "x")]
    )
    assert args.func(args) == 2
    assert "no such file" in capsys.readouterr().err
