"""What each attention record kind is: the one table that capture, the summary map, the service's
maps and both protocol adapters read.

A record's tensor is batch first, as the block's tap produced it. `display` turns it into what
is served and drawn: one array per image with `rank` dimensions, GC's context mask multiplied
by h*w so that a uniform mask reads 1. Adding a block or a record kind touches its block file
and this table, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class RecordKind:
    """One kind of attention record.

    spatial: an (N, 1, h, w) map over the feature grid; it enters the summary map and is
    resampled onto the original image. rank: dimensions per image after `display`.
    scale: "area" multiplies the map by h*w (a softmax over positions: uniform = 1).
    points: (x, y) pixel coordinates on the model input; the service gives them on the original
    image. picture: how a picture answer draws it: "map" (a heatmap where it is 2-D), "image"
    (the spatial transformer's output, drawn as an image) or "none" (numbers only).
    """

    name: str
    shape: str
    rank: int
    spatial: bool = False
    scale: Literal["none", "area"] = "none"
    points: bool = False
    picture: Literal["map", "image", "none"] = "map"


RECORD_KINDS: dict[str, RecordKind] = {
    k.name: k
    for k in (
        RecordKind("channel", "(N, C)", rank=1),
        RecordKind("spatial", "(N, 1, h, w)", rank=2, spatial=True),
        RecordKind("context", "(N, 1, h, w)", rank=2, spatial=True, scale="area"),
        RecordKind("coord_h", "(N, C, h, 1)", rank=2),
        RecordKind("coord_w", "(N, C, 1, w)", rank=2),
        RecordKind("branch", "(N, M, C)", rank=2),
        RecordKind("theta", "(N, 2, 3)", rank=2, picture="none"),
        RecordKind("region", "(N, 4, 2)", rank=2, points=True, picture="none"),
        RecordKind("crop", "(N, C, h, w)", rank=3, picture="image"),
    )
}
"""Tap kinds that become records; any other tap kind (SK's "feature") stays internal. A spatial
transformer's "spatial" record is its sampling density on its input grid (genuine)."""

RESAMPLING_BLOCKS = frozenset({"stn"})
"""Blocks whose output is a resampled image: the sites after them see its grid, not the input's."""

SPATIAL_KINDS = tuple(name for name, kind in RECORD_KINDS.items() if kind.spatial)


def display(kind: str, tensor: torch.Tensor) -> torch.Tensor:
    """A record's batch-first tensor as served: (N, h, w) for spatial kinds (area-scaled where
    the table says), (N, C, h|w) for coordinate gates, otherwise as recorded; float32."""
    info = RECORD_KINDS[kind]
    return display_values(tensor, info.spatial, info.scale == "area", info.rank)


def display_values(tensor: torch.Tensor, spatial: bool, area: bool, rank: int) -> torch.Tensor:
    """`display` with the kind's table entry spelled out, so TorchScript can compile it."""
    values = tensor.float()
    if spatial:
        if values.dim() != 4 or values.size(1) != 1:
            raise ValueError("a spatial record must be (N, 1, h, w)")
        values = values[:, 0]
        if area:
            values = values * (values.size(-2) * values.size(-1))
        return values
    shape = [values.size(0)] + [values.size(d) for d in range(1, rank)] + [-1]
    return values.reshape(shape)
