"""What a device thread does with one batch: stack, forward with capture, the batch's maps.

It returns numbers only, one `ImageResult` per item; rounding and encoding are the adapters' work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models import spatial_views
from service.budget import MapCounts
from service.imaging import Geometry
from service.maps import ImageMaps, MapPlan, batch_maps
from service.runner import ModelRunner

__all__ = ["ImageResult", "Item", "map_counts", "run_batch"]


@dataclass(frozen=True, slots=True)
class Item:
    """One image queued for a model: its input tensor (C, H, W), the maps to prepare for it
    (None: no maps) and where it came from (None for tensor inputs)."""

    tensor: torch.Tensor
    plan: MapPlan | None = None
    geometry: Geometry | None = None


@dataclass(frozen=True, slots=True)
class ImageResult:
    """One image's answer as numbers: class probabilities (K,) float32 and its maps."""

    probs: np.ndarray
    geometry: Geometry | None
    maps: ImageMaps | None


def run_batch(runner: ModelRunner, items: list[Item]) -> list[ImageResult]:
    """One forward of the items, capturing attention if any item wants maps."""
    capture = any(item.plan is not None for item in items)
    out = runner.forward(torch.stack([item.tensor for item in items]), capture)
    plans = [item.plan for item in items]
    maps = batch_maps(out.records, out.summary, plans) if capture else [None] * len(items)
    probs = out.probs.numpy()
    return [
        ImageResult(probs[i], item.geometry, image_maps)
        for i, (item, image_maps) in enumerate(zip(items, maps, strict=True))
    ]


def map_counts(runner: ModelRunner) -> MapCounts:
    """How many maps the model gives per image (for the request budgets), from one capture
    forward of a blank input."""
    if runner.input_size is None:
        return MapCounts(0, 0)
    out = runner.forward(torch.zeros((1, *runner.input_size)), True)
    native = sum(record.tensor[0].numel() for record in out.records)
    return MapCounts(len(spatial_views(out.records)), native)
