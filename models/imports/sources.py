"""Reading an import source into a flat dict of tensors (plus the timm config, if any).

A source is a timm / Hugging Face hub directory (``config.json`` next to ``model.safetensors`` or
``pytorch_model.bin``) or one checkpoint file (``.safetensors``, ``.pth``, ``.pth.tar``, ``.pt``,
``.bin``). Pickled files are read only with ``torch.load(weights_only=True)``: a file that needs
arbitrary Python objects to unpickle is refused. A checkpoint may wrap its state dict in
``state_dict`` or ``model`` (training scripts save epoch, optimizer, ... next to it) and carry the
``module.`` prefix of ``nn.DataParallel``; both are undone here.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

CONFIG_FILE = "config.json"
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth.tar", ".pth", ".pt", ".bin")
WRAPPER_KEYS = ("state_dict", "model")


class ImportFailed(ValueError):
    """The source cannot be imported; the message says why and what to do."""


@dataclass(frozen=True)
class Source:
    """What was read: tensors by (unwrapped) key, the hub config (None for a bare checkpoint),
    the weights file and its sha256, and how the state dict was wrapped."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    weights_file: Path
    sha256: str
    wrapping: str


def read_source(path: str | Path) -> Source:
    """Read a hub directory or a checkpoint file; ImportFailed with a clear message otherwise."""
    path = Path(path)
    if path.is_dir():
        return _read_hub_directory(path)
    if not path.is_file():
        raise ImportFailed(f"{path}: no such file or directory")
    if not path.name.endswith(CHECKPOINT_SUFFIXES):
        raise ImportFailed(
            f"{path}: not a checkpoint file (expected one of {list(CHECKPOINT_SUFFIXES)}) "
            f"or a hub directory with {CONFIG_FILE}"
        )
    tensors, wrapping = _read_weights(path)
    return Source(tensors, None, path, _sha256(path), wrapping)


def _read_hub_directory(directory: Path) -> Source:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ImportFailed(
            f"{directory}: a hub directory needs {CONFIG_FILE} (timm's architecture and "
            "pretrained_cfg); for a bare checkpoint pass the file itself"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ImportFailed(f"{config_path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ImportFailed(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    weights = next((directory / n for n in HUB_WEIGHT_FILES if (directory / n).is_file()), None)
    if weights is None:
        raise ImportFailed(
            f"{directory}: no weights file, expected one of {list(HUB_WEIGHT_FILES)}"
        )
    tensors, wrapping = _read_weights(weights)
    return Source(tensors, config, weights, _sha256(weights), wrapping)


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if path.name.endswith(".safetensors"):
        try:
            return dict(safetensors.torch.load_file(path)), "safetensors"
        except Exception as exc:
            raise ImportFailed(f"{path}: not a valid safetensors file: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needed = re.search(r"GLOBAL (\S+)", str(exc))
        detail = f" (it needs {needed.group(1)})" if needed else ""
        raise ImportFailed(
            f"{path}: refused: the file needs arbitrary Python objects to unpickle{detail}, and "
            "checkpoints are read only with torch.load(weights_only=True). "
            "Hint: save the state dict alone (torch.save(model.state_dict(), path)) or convert "
            "it to safetensors where you trust the file."
        ) from None
    except Exception as exc:
        raise ImportFailed(f"{path}: not a readable PyTorch checkpoint: {exc}") from None
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside `obj` (bare, or under 'state_dict' / 'model'), prefix removed."""
    wrapping = []
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise ImportFailed(
                f"{path}: no state dict found: the file holds a dict with keys "
                f"{sorted(map(str, obj))[:8]}, none a tensor dict nor one of {list(WRAPPER_KEYS)}"
            )
        wrapping.append(key)
        obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        raise ImportFailed(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
        wrapping.append("module.")
    return tensors, " > ".join(wrapping) or "bare state dict"


def _is_state_dict(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
