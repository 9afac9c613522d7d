"""Model packages: a directory holding `model.safetensors` (weights) and `card.json` (what the
model is: architecture, block, options, data config, provenance, metrics).

Loading never unpickles: weights are safetensors, the card is JSON. The card records the sha256
of the weights file, checked on load, and save/load round-trips every tensor bit-exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from models.attention import ATTENTION_BLOCKS
from models.data_config import DataConfig
from models.registry import create_model, list_models
from models.resnet import ResNet

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS: tuple[int, ...] = (1,)
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


class PackageError(ValueError):
    """A model package is invalid: a bad card, or weights that do not match it."""


@dataclass
class ModelCard:
    """Everything needed to rebuild a packaged model, plus its provenance and metrics.

    `model_kwargs` are the `create_model` options; `weights_sha256` is filled by `save_package`.
    """

    name: str
    arch: str
    attention: str
    num_classes: int
    in_chans: int
    model_kwargs: dict[str, Any]
    data_config: DataConfig
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"card name must be letters, digits, '.', '_' or '-' (not first), got {self.name!r}"
            )
        _check_choice("format_version", self.format_version, SUPPORTED_FORMAT_VERSIONS)
        _check_choice("arch", self.arch, tuple(list_models()))
        _check_choice("attention", self.attention, ATTENTION_BLOCKS)
        for key in ("num_classes", "in_chans"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"card {key} must be a positive int, got {value!r}")
        for key in ("model_kwargs", "training", "metrics"):
            setattr(self, key, _json_dict(key, getattr(self, key)))
        if self.weights_sha256 and not _SHA_RE.fullmatch(str(self.weights_sha256)):
            raise ValueError(
                f"card weights_sha256 must be 64 hex digits, got {self.weights_sha256!r}"
            )
        self._check_data_config()

    def _check_data_config(self) -> None:
        """Accept a dict (from JSON); the config must fit the model's input and class count."""
        if isinstance(self.data_config, Mapping):
            self.data_config = DataConfig.from_dict(self.data_config)
        if not isinstance(self.data_config, DataConfig):
            raise ValueError(f"card data_config must be a DataConfig, got {self.data_config!r}")
        if self.data_config.channels != self.in_chans:
            raise ValueError(
                f"card data_config has {self.data_config.channels} channels, in_chans is "
                f"{self.in_chans}"
            )
        if len(self.data_config.labels) != self.num_classes:
            raise ValueError(
                f"card has {len(self.data_config.labels)} labels but num_classes={self.num_classes}"
            )

    @classmethod
    def from_model(
        cls,
        model: ResNet,
        name: str,
        *,
        training: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> ModelCard:
        """A card for a model made by `create_model` (its arch, block, options, data config)."""
        _check_model_attributes(model)
        return cls(
            name=name,
            arch=model.arch,
            attention=model.attention,
            num_classes=model.num_classes,
            in_chans=model.in_chans,
            model_kwargs=dict(model.model_kwargs),
            data_config=model.data_config,
            training=dict(training or {}),
            metrics=dict(metrics or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        data = asdict(self)
        data["data_config"] = self.data_config.to_dict()
        return data

    def to_json(self) -> str:
        """The card.json text: pretty-printed, keys sorted, newline-terminated."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Inverse of `to_dict`; unknown or missing keys and invalid values raise ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a model card is a JSON object, got {type(data).__name__}")
        if "format_version" in data:  # first: a newer format may have other keys
            _check_choice("format_version", data["format_version"], SUPPORTED_FORMAT_VERSIONS)
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown card keys {unknown}; valid: {names}")
        required = [f.name for f in fields(cls) if f.default is f.default_factory is MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"card is missing required keys {missing}")
        return cls(**dict(data))


def save_package(model: nn.Module, card: ModelCard, directory: str | os.PathLike[str]) -> ModelCard:
    """Write `model`'s weights and `card` to `directory` (created if needed; files replaced).

    Returns the card as written, with `weights_sha256` set. ValueError if the card does not
    describe the model.
    """
    _check_card_matches(model, card)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # One metadata key only: safetensors writes metadata in hash order, so several keys would make
    # two saves of the same weights differ byte for byte (the card carries arch and block).
    weights = safetensors.torch.save(state, metadata={"format": "pt"})
    card = replace(card, weights_sha256=hashlib.sha256(weights).hexdigest())
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / WEIGHTS_FILE, weights)
    _write_atomic(directory / CARD_FILE, card.to_json().encode("utf-8"))
    return card


def load_package(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[ResNet, ModelCard]:
    """Read a package written by `save_package`; the model comes back in eval mode on `device`.

    FileNotFoundError for a missing directory or file, PackageError (a ValueError) for an invalid
    card, a weights file whose sha256 differs from the card's, or weights that do not fit.
    """
    directory = Path(directory)
    card_path, weights_path = directory / CARD_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"model package directory not found: {directory}")
    for path in (card_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"model package {directory} has no {path.name} "
                f"(a package holds {WEIGHTS_FILE} and {CARD_FILE})"
            )
    card = read_card(card_path)
    data = weights_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.weights_sha256:
        raise PackageError(
            f"{weights_path}: sha256 {digest} does not match the card's {card.weights_sha256}; "
            "the weights file was modified or corrupted (re-save the package)"
        )
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:
        raise PackageError(f"{weights_path}: not a valid safetensors file: {exc}") from None
    try:
        model = create_model(
            card.arch,
            card.attention,
            card.num_classes,
            card.in_chans,
            data_config=card.data_config,
            **card.model_kwargs,
        )
    except (TypeError, ValueError) as exc:
        raise PackageError(f"{card_path}: cannot build the model: {exc}") from None
    _load_weights(model, tensors, weights_path)
    return model.to(device).eval(), card


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """Parse and validate a card.json file; PackageError naming the file if invalid."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if not data.get("weights_sha256"):
            raise ValueError("card has no weights_sha256 (write packages with save_package)")
        return ModelCard.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise PackageError(f"{path}: invalid model card: {exc}") from None


_MODEL_ATTRIBUTES = ("arch", "attention", "num_classes", "in_chans", "model_kwargs", "data_config")


def _check_model_attributes(model: nn.Module) -> None:
    missing = [a for a in _MODEL_ATTRIBUTES if not hasattr(model, a)]
    if missing:
        raise ValueError(f"model lacks {missing}; build it with models.create_model")


def _check_card_matches(model: nn.Module, card: ModelCard) -> None:
    """ValueError if the card would rebuild a different network than `model`."""
    _check_model_attributes(model)
    card_values = {a: getattr(card, a) for a in _MODEL_ATTRIBUTES if a != "data_config"}
    wrong = {a: (getattr(model, a), v) for a, v in card_values.items() if getattr(model, a) != v}
    if wrong:
        detail = "; ".join(f"{a}: model {m!r}, card {c!r}" for a, (m, c) in wrong.items())
        raise ValueError(f"card {card.name!r} does not describe the model ({detail})")


def _check_choice(key: str, value: Any, valid: tuple[Any, ...]) -> None:
    if isinstance(value, bool) or value not in valid:
        raise ValueError(f"unknown {key} {value!r}; valid: {list(valid)}")


def _json_dict(key: str, value: Any) -> dict[str, Any]:
    """A JSON-normalised copy of a dict field (tuples become lists); ValueError if not JSON-able."""
    if not isinstance(value, Mapping):
        raise ValueError(f"card {key} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"card {key} must be JSON-serialisable: {exc}") from None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy `tensors` into `model`; PackageError naming what is missing, extra or mis-shaped."""
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
    for key in sorted(set(expected) & set(tensors)):
        want, got = expected[key], tensors[key]
        if want.shape != got.shape or want.dtype != got.dtype:
            problems.append(
                f"{key}: {got.dtype} {tuple(got.shape)}, model expects "
                f"{want.dtype} {tuple(want.shape)}"
            )
    if problems:
        raise PackageError(
            f"{path}: weights do not match the card's model: " + "; ".join(problems[:5])
        )
    model.load_state_dict(tensors, strict=True)
