"""Data configuration carried by every model: input geometry, normalisation and class labels.

Preprocessing is derived from this object alone, so no ImageNet constant ever appears in
handler code. It is frozen and round-trips through JSON via `to_dict` / `from_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class DataConfig:
    """How to turn an image into the model's input tensor, and what its outputs mean.

    `crop_pct`: resize the shorter side to H / crop_pct, then centre-crop H x W
    (1.0 = resize the shorter side to H, then centre-crop).
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_field = object.__setattr__
        set_field(self, "input_size", _int_triple(self.input_size))
        channels = self.input_size[0]
        set_field(self, "mean", _float_tuple("mean", self.mean, channels))
        set_field(self, "std", _float_tuple("std", self.std, channels))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"DataConfig.std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"DataConfig.interpolation must be one of {INTERPOLATIONS}, "
                f"got {self.interpolation!r}"
            )
        crop = self.crop_pct
        if isinstance(crop, bool) or not isinstance(crop, int | float) or not 0 < crop <= 1:
            raise ValueError(f"DataConfig.crop_pct must be a number in (0, 1], got {crop!r}")
        set_field(self, "crop_pct", float(crop))
        set_field(self, "labels", _labels(self.labels))

    @property
    def channels(self) -> int:
        """Number of input channels (C of input_size)."""
        return self.input_size[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "labels": list(self.labels),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        """Inverse of `to_dict`; unknown or missing keys raise ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"DataConfig.from_dict expects a mapping, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown DataConfig keys {unknown}; valid keys: {sorted(names)}")
        missing = sorted({"input_size", "mean", "std"} - set(data))
        if missing:
            raise ValueError(f"DataConfig is missing required keys {missing}")
        return cls(**dict(data))


def default_labels(num_classes: int, *, prefix: str = "class_") -> tuple[str, ...]:
    """Placeholder labels `prefix0 .. prefix{n-1}` for a model without named classes."""
    return tuple(f"{prefix}{i}" for i in range(num_classes))


def _int_triple(value: Any) -> tuple[int, int, int]:
    if (
        isinstance(value, str | bytes)
        or not isinstance(value, Sequence)
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(
            f"DataConfig.input_size must be three positive ints (C, H, W), got {value!r}"
        )
    return (value[0], value[1], value[2])


def _float_tuple(name: str, value: Any, length: int) -> tuple[float, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"DataConfig.{name} must be a sequence of {length} numbers, got {value!r}")
    if len(value) != length or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise ValueError(
            f"DataConfig.{name} must have one finite number per input channel "
            f"({length}), got {value!r}"
        )
    return tuple(float(v) for v in value)


def _labels(value: Any) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"DataConfig.labels must be a sequence of strings, got {value!r}")
    if not all(isinstance(v, str) for v in value):
        raise ValueError("DataConfig.labels must contain only strings")
    return tuple(value)


def imagenet_data_config(in_chans: int = 3, num_classes: int = 1000) -> DataConfig:
    """Default config of the ImageNet-style archs: 224x224, crop_pct 0.875, ImageNet mean/std
    (0.5/0.5 per channel when the model does not take 3-channel input)."""
    mean = IMAGENET_MEAN if in_chans == 3 else (0.5,) * in_chans
    std = IMAGENET_STD if in_chans == 3 else (0.5,) * in_chans
    return DataConfig(
        input_size=(in_chans, 224, 224),
        mean=mean,
        std=std,
        interpolation="bilinear",
        crop_pct=0.875,
        labels=default_labels(num_classes),
    )
