"""Attention maps as numbers: where each map lands on the original image, and a batch's maps.

Spatial maps live on the model input grid (after resize and centre crop). `map_grid` gives one
image's sampling grid: the centres of a grid covering the whole original image (longest side =
map size) mapped into the model input, plus a mask of the cells inside the crop. `batch_maps`
resamples a whole batch on the device thread, one grid_sample per map for every image of the
same map shape; point records (a spatial transformer's region) are mapped onto the original
image's pixels by `points_to_original`. Values keep the scale the kinds table gives them (gates
in [0, 1], GC context masks times h*w, the summary min-max normalised); rounding and encoding
are the adapters' work.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from models import RECORD_KINDS, AttentionRecord, spatial_views
from models.attention.kinds import display_values
from service.imaging import Geometry

__all__ = [
    "ImageMaps",
    "LayerMap",
    "MapPlan",
    "MapRequest",
    "MapsLevel",
    "batch_maps",
    "default_map_size",
    "map_grid",
    "output_size",
    "points_to_original",
    "to_original",
]

MapsLevel = Literal["none", "summary", "layers", "all"]
MAX_DEFAULT_MAP_SIZE = 64
MIN_MAP_SIZE = 8


@dataclass(frozen=True, slots=True)
class MapRequest:
    """Which maps a request wants: none; summary; layers (+ each site's spatial view on the
    image); all (+ every record at native resolution). `size`: longest side on the image
    (None: `default_map_size` of each image)."""

    level: MapsLevel = "summary"
    size: int | None = None


@dataclass(frozen=True, slots=True)
class MapPlan:
    """One image's share of its batch's map work: the level, and where its maps go on the
    original image (`map_grid`, and the geometry for points); None for inputs without an
    image."""

    level: MapsLevel
    grid: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    geometry: Geometry | None = None

    @classmethod
    def for_image(cls, geometry: Geometry | None, request: MapRequest) -> MapPlan | None:
        """None when no maps were asked for."""
        if request.level == "none":
            return None
        if geometry is None:
            return cls(request.level)
        grid, mask = map_grid(geometry, request.size or default_map_size(geometry))
        return cls(request.level, grid, mask, geometry)


@dataclass(frozen=True, slots=True)
class LayerMap:
    """One attention record of one image: where it comes from, and its values (float32), on
    the original image (`on_image`, a resampled spatial view) or at native resolution."""

    layer: str
    block: str
    kind: str
    derived: bool
    on_image: bool
    values: np.ndarray


@dataclass(frozen=True, slots=True)
class ImageMaps:
    """One image's maps. summary: on the original image (on the model input grid without
    one); grid_summary: always on the model input grid; layers: level "layers" and up, in
    record order, the spatial view of each site on the image plus, at level "all", the other
    records at native resolution; native: level "all", every record at native resolution."""

    summary: np.ndarray | None
    grid_summary: np.ndarray | None
    layers: list[LayerMap]
    native: list[LayerMap]


def default_map_size(geometry: Geometry) -> int:
    """The image's longest side, at most 64 and at least 8: a map never has more cells than the
    image has pixels, and a photo's maps stay small."""
    longest = max(geometry.width, geometry.height)
    return max(MIN_MAP_SIZE, min(MAX_DEFAULT_MAP_SIZE, longest))


def output_size(width: int, height: int, map_size: int) -> tuple[int, int]:
    """(rows, cols) of a map covering a width x height image with its longest side = map_size."""
    if width >= height:
        return max(1, round(map_size * height / width)), map_size
    return map_size, max(1, round(map_size * width / height))


@functools.lru_cache(maxsize=256)
def map_grid(geometry: Geometry, map_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling grid (1, rows, cols, 2) into the model input, and the inside-the-crop mask.

    Cached: clients usually send images of a few sizes. The tensors are shared; callers must
    not modify them.
    """
    rows, cols = output_size(geometry.width, geometry.height, map_size)
    xs = (torch.arange(cols, dtype=torch.float64) + 0.5) * (geometry.width / cols)
    ys = (torch.arange(rows, dtype=torch.float64) + 0.5) * (geometry.height / rows)
    xc = xs * geometry.scale_x - geometry.crop_left
    yc = ys * geometry.scale_y - geometry.crop_top
    inside_x = (xc >= 0) & (xc < geometry.crop_width)
    inside_y = (yc >= 0) & (yc < geometry.crop_height)
    gx = (2.0 * xc / geometry.crop_width - 1.0).float()
    gy = (2.0 * yc / geometry.crop_height - 1.0).float()
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1).unsqueeze(0)
    return grid, inside_y[:, None] & inside_x[None, :]


def points_to_original(points: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(..., 2) (x, y) pixel-edge coordinates on the model input -> on the original image: the
    centre crop and the resize undone (the inverse of `map_grid`'s mapping)."""
    offset = np.array([geometry.crop_left, geometry.crop_top], dtype=np.float64)
    scale = np.array([geometry.scale_x, geometry.scale_y], dtype=np.float64)
    return ((points.astype(np.float64) + offset) / scale).astype(np.float32)


def _resample(maps: torch.Tensor, grids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(G, h, w) maps on the model input grid -> (G, rows, cols) on the original images, with
    `map_grid`'s grids (G, rows, cols, 2) and masks (G, rows, cols); zeros outside the crop."""
    sampled = F.grid_sample(maps[:, None], grids, padding_mode="border", align_corners=False)
    return sampled[:, 0] * masks


def to_original(grid_map: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One (h, w) map on the model input grid resampled onto the original image."""
    return _resample(grid_map.float()[None], grid, mask[None])[0]


def _group_maps(
    summary: torch.Tensor | None,
    tensors: list[torch.Tensor],
    spatial: list[bool],
    area: list[bool],
    rank: list[int],
    place: list[bool],
    native: bool,
    members: list[int],
    grids: list[torch.Tensor],
    masks: list[torch.Tensor],
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
    """One group's maps: the summary and the records marked `place` resampled onto the
    images (when there are `grids`), and with `native` every record as `display` gives it.

    Run as TorchScript (`_group_maps_graph`): one call without the GIL for the whole group,
    as the traced forward (op by op from Python, the device thread would give the GIL back
    and wait for it again on every op, behind the event loop)."""
    index = torch.tensor(members, dtype=torch.long)
    resample = len(grids) > 0
    g = torch.cat(grids) if resample else torch.empty(0)
    m = torch.stack(masks) if resample else torch.empty(0)
    placed_summary: torch.Tensor | None = None
    if summary is not None:
        values = summary.index_select(0, index).float()
        placed_summary = _resample(values, g, m) if resample else values
    placed: list[torch.Tensor] = []
    natives: list[torch.Tensor] = []
    for i in range(len(tensors)):
        if place[i] or native:
            values = display_values(tensors[i].index_select(0, index), spatial[i], area[i], rank[i])
            if native:
                natives.append(values)
            if place[i]:
                placed.append(_resample(values, g, m) if resample else values)
    return placed_summary, placed, natives


with warnings.catch_warnings():  # torch.jit.script's deprecation notice: it is what runs the
    warnings.simplefilter("ignore", DeprecationWarning)  # whole group without the GIL here
    _group_maps_graph = torch.jit.script(_group_maps)


def batch_maps(
    records: list[AttentionRecord], summary: torch.Tensor | None, plans: list[MapPlan | None]
) -> list[ImageMaps | None]:
    """Every image's maps for a whole batch (records and summary batch first, on the CPU);
    None where an image has no plan. Images with the same level and map shape are done
    together, in one `_group_maps` call."""
    groups: dict[tuple[str, tuple[int, ...] | None], list[int]] = {}
    for i, plan in enumerate(plans):
        if plan is not None:
            shape = None if plan.mask is None else tuple(plan.mask.shape)
            groups.setdefault((plan.level, shape), []).append(i)
    result: list[ImageMaps | None] = [None] * len(plans)
    grid_summary = None if summary is None else summary.numpy()
    views = {id(r) for r in spatial_views(records)}
    kinds = [RECORD_KINDS[r.kind] for r in records]
    for (level, shape), members in groups.items():
        on_image = shape is not None
        place = [level in ("layers", "all") and id(r) in views for r in records]
        summaries, placed, natives = _group_maps_graph(
            summary,
            [r.tensor for r in records],
            [k.spatial for k in kinds],
            [k.scale == "area" for k in kinds],
            [k.rank for k in kinds],
            place,
            level == "all",
            members,
            [plans[i].grid for i in members] if on_image else [],  # type: ignore[union-attr]
            [plans[i].mask for i in members] if on_image else [],  # type: ignore[union-attr]
        )
        placed_arrays = iter([t.numpy() for t in placed])
        native = [(r, t.numpy()) for r, t in zip(records, natives, strict=False)]  # [] below "all"
        layers: list[tuple[AttentionRecord, bool, np.ndarray]] = []
        for j, record in enumerate(records):
            if place[j]:
                layers.append((record, on_image, next(placed_arrays)))
            elif kinds[j].points and level in ("layers", "all"):
                layers.append((record, on_image, _points(record, members, plans, on_image)))
            elif level == "all" and not kinds[j].spatial:
                layers.append((record, False, native[j][1]))
        summary_arrays = None if summaries is None else summaries.numpy()
        for g, i in enumerate(members):
            result[i] = ImageMaps(
                None if summary_arrays is None else summary_arrays[g],
                None if grid_summary is None else grid_summary[i],
                [_layer(r, on, values[g]) for r, on, values in layers],
                [_layer(r, False, values[g]) for r, values in native],
            )
    return result


def _points(
    record: AttentionRecord, members: list[int], plans: list[MapPlan | None], on_image: bool
) -> np.ndarray:
    """A point record of a group's images, on each original image when they have one."""
    values = record.tensor.index_select(0, torch.tensor(members)).float().numpy()
    if not on_image:
        return values
    geometries = [plans[i].geometry for i in members]  # type: ignore[union-attr]
    return np.stack([points_to_original(v, g) for v, g in zip(values, geometries, strict=True)])


def _layer(record: AttentionRecord, on_image: bool, values: np.ndarray) -> LayerMap:
    return LayerMap(record.site, record.block, record.kind, record.derived, on_image, values)
