"""A small ResNet ("resnet_small") for low-resolution inputs such as 1x64x64 digits.

Same blocks and attention placement as `models.resnet` (it is a `ResNet` with other data):
a 3x3/2 conv + BN + ReLU stem without max pool (64x64 -> 32x32), then BasicBlock stages of
widths (32, 64, 128), strides (1, 2, 2) and one block each, so a 64x64 input ends on an 8x8
map. Widths are multiples of 32 so that SK with 32 groups works. About 0.3M parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from models.data_config import DataConfig, default_labels
from models.resnet import ResNet

SMALL_WIDTHS: tuple[int, ...] = (32, 64, 128)
SMALL_DEPTHS: tuple[int, ...] = (1, 1, 1)
SMALL_INPUT_HW: tuple[int, int] = (64, 64)


def resnet_small(
    num_classes: int = 10,
    in_chans: int = 1,
    *,
    attention: str = "none",
    widths: Sequence[int] = SMALL_WIDTHS,
    depths: Sequence[int] = SMALL_DEPTHS,
    **kwargs: Any,
) -> ResNet:
    """Build the small ResNet; `kwargs` are the ResNet attention/dropout options."""
    widths = _positive_ints("widths", widths)
    depths = _positive_ints("depths", depths)
    if len(widths) != len(depths):
        raise ValueError(f"widths {widths} and depths {depths} must have the same length")
    return ResNet(
        "basic",
        depths,
        num_classes,
        in_chans,
        widths=widths,
        strides=(1,) + (2,) * (len(depths) - 1),
        stem_width=widths[0],
        stem_kernel=3,
        stem_pool="none",
        attention=attention,
        **kwargs,
    )


def small_data_config(in_chans: int = 1, num_classes: int = 10) -> DataConfig:
    """Default config: 64x64, mean/std 0.5 (trainers overwrite them with measured statistics),
    no crop, labels "0".."{n-1}"."""
    return DataConfig(
        input_size=(in_chans, *SMALL_INPUT_HW),
        mean=(0.5,) * in_chans,
        std=(0.5,) * in_chans,
        interpolation="bilinear",
        crop_pct=1.0,
        labels=default_labels(num_classes, prefix=""),
    )


def _positive_ints(name: str, value: Sequence[int]) -> tuple[int, ...]:
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {value!r}")
    return tuple(value)
