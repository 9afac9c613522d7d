"""Model packages: bit-exact round trip, card format, tamper detection, no unpickling."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from models import ModelCard, create_model, load_package, save_package
from models.data_config import DataConfig
from models.package import CARD_FILE, WEIGHTS_FILE, PackageError

BLOCKS = ("none", "se", "eca", "cbam", "gc", "coordatt", "sk")


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN statistic a non-default value, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.fill_(7)
    return model.eval()


def _card(model: nn.Module, name: str = "digits-test") -> ModelCard:
    return ModelCard.from_model(
        model, name, training={"epochs": 3, "seed": 0}, metrics={"top1": 0.875}
    )


@pytest.fixture
def package(tmp_path: Path) -> Path:
    model = _trained_like(create_model("resnet_small", "cbam"))
    save_package(model, _card(model), tmp_path / "pkg")
    return tmp_path / "pkg"


@pytest.mark.parametrize("attention", BLOCKS)
def test_round_trip_is_bit_exact(tmp_path: Path, attention: str) -> None:
    options = {"gc_stages": [1, 3]} if attention == "gc" else {}
    config = DataConfig((1, 64, 64), (0.1307,), (0.3081,), "bilinear", 1.0, tuple("abcd"))
    model = create_model(
        "resnet_small", attention, num_classes=4, data_config=config, drop_rate=0.2, **options
    )
    model = _trained_like(model)
    written = save_package(model, _card(model), tmp_path / attention)
    loaded, card = load_package(tmp_path / attention)
    assert card == written and card.data_config == config
    assert card.model_kwargs == {"drop_rate": 0.2, **options}
    assert not loaded.training and loaded.data_config == config
    assert (loaded.arch, loaded.attention, loaded.model_kwargs) == (
        "resnet_small",
        attention,
        card.model_kwargs,
    )
    before, after = model.state_dict(), loaded.state_dict()
    assert list(before) == list(after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    x = torch.randn(2, 1, 48, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_imagenet_arch_round_trip_keeps_eca_kernels(tmp_path: Path) -> None:
    model = _trained_like(create_model("resnet18", "eca", num_classes=5))
    save_package(model, _card(model, "r18-eca"), tmp_path)
    loaded, card = load_package(tmp_path)
    assert card.arch == "resnet18" and card.data_config.input_size == (3, 224, 224)
    assert [getattr(loaded, f"layer{i}")[0].attn.kernel_size for i in (1, 2, 3, 4)] == [3, 5, 7, 7]
    x = torch.randn(1, 3, 64, 80)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_saving_the_same_weights_twice_gives_identical_files(tmp_path: Path) -> None:
    model = _trained_like(create_model("resnet_small", "gc"))
    first = save_package(model, _card(model, "twice"), tmp_path / "a")
    second = save_package(model, _card(model, "twice"), tmp_path / "b")
    assert first.weights_sha256 == second.weights_sha256
    assert (tmp_path / "a" / WEIGHTS_FILE).read_bytes() == (
        tmp_path / "b" / WEIGHTS_FILE
    ).read_bytes()


def test_files_are_safetensors_and_sorted_pretty_json(package: Path) -> None:
    weights = (package / WEIGHTS_FILE).read_bytes()
    assert not weights.startswith((b"PK", b"\x80"))  # neither a torch zip nor a pickle stream
    header_len = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + header_len])
    assert header["__metadata__"] == {"format": "pt"}
    with safe_open(package / WEIGHTS_FILE, framework="pt") as f:
        assert set(f.keys()) == set(create_model("resnet_small", "cbam").state_dict())
    text = (package / CARD_FILE).read_text()
    card = json.loads(text)
    assert text == json.dumps(card, indent=2, sort_keys=True) + "\n"
    assert card["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert card["format_version"] == 1 and card["attention"] == "cbam"
    assert card["data_config"]["labels"] == [str(i) for i in range(10)]
    assert sorted(card) == sorted(ModelCard.__dataclass_fields__)


def test_loading_never_unpickles(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling during load_package")

    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(target, name, forbidden)
    model, card = load_package(package)
    assert card.name == "digits-test" and isinstance(model, nn.Module)


def test_tampered_weights_are_rejected(package: Path) -> None:
    path = package / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # flip one bit in the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"sha256 .* does not match"):
        load_package(package)


def _edit_card(package: Path, **changes: object) -> None:
    card = json.loads((package / CARD_FILE).read_text())
    card.update(changes)
    (package / CARD_FILE).write_text(json.dumps(card))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format_version": 2}, "format_version 2; valid: \\[1\\]"),
        ({"arch": "vgg16"}, "unknown arch 'vgg16'; valid: \\[.*'resnet_small'"),
        ({"attention": "nl"}, "unknown attention 'nl'; valid: \\[.*'coordatt'"),
        ({"model_kwargs": {"widths": [32, 64, 256]}}, "weights do not match.*layer3"),
        ({"model_kwargs": {"depth": 3}}, "cannot build the model.*unknown option"),
        ({"num_classes": 12}, "12"),
        ({"weights_sha256": ""}, "no weights_sha256"),
        ({"extra": 1}, "unknown card keys \\['extra'\\]"),
        ({"name": "../evil"}, "card name"),
    ],
)
def test_invalid_cards_are_rejected(package: Path, changes: dict, match: str) -> None:
    _edit_card(package, **changes)
    with pytest.raises(PackageError, match=match):
        load_package(package)


def test_missing_fields_and_bad_json(package: Path) -> None:
    card = json.loads((package / CARD_FILE).read_text())
    del card["data_config"]
    (package / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(PackageError, match="missing required keys \\['data_config'\\]"):
        load_package(package)
    (package / CARD_FILE).write_text("{not json")
    with pytest.raises(PackageError, match=r"card\.json: invalid model card"):
        load_package(package)


def test_missing_files_are_named(package: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_package(tmp_path / "nowhere")
    (package / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"has no {WEIGHTS_FILE}"):
        load_package(package)


def test_save_rejects_a_card_for_another_model(tmp_path: Path) -> None:
    model = create_model("resnet_small", "se")
    card = _card(create_model("resnet_small", "eca"))
    with pytest.raises(ValueError, match="attention: model 'se', card 'eca'"):
        save_package(model, card, tmp_path)
    with pytest.raises(ValueError, match=r"build it with models\.create_model"):
        save_package(nn.Linear(2, 2), card, tmp_path)
    assert not (tmp_path / WEIGHTS_FILE).exists()


def test_card_validation_and_json_normalisation() -> None:
    model = create_model("resnet_small", "gc", gc_stages=(2, 3))
    card = _card(model)
    assert card.model_kwargs == {"gc_stages": [2, 3]}
    assert ModelCard.from_dict(json.loads(card.to_json())) == card
    with pytest.raises(ValueError, match="JSON-serialisable"):
        ModelCard.from_model(model, "x", training={"seen": {1, 2}})
    with pytest.raises(ValueError, match="labels but num_classes"):
        ModelCard(**{**card.__dict__, "num_classes": 3})


def test_model_kwargs_rebuild_through_create_model(package: Path) -> None:
    model, card = load_package(package)
    rebuilt = create_model(
        card.arch, card.attention, card.num_classes, card.in_chans, **card.model_kwargs
    )
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_cuda(package: Path) -> None:
    cpu_model, _ = load_package(package)
    gpu_model, _ = load_package(package, device="cuda")
    assert all(p.is_cuda for p in gpu_model.parameters())
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(gpu_model(x.cuda()).cpu(), cpu_model(x), rtol=1e-4, atol=1e-4)
