"""Turn model outputs into response data: top-k predictions and attention maps.

Spatial maps live on the model input grid (after resize and centre crop). `to_original` undoes
that: it samples each map at the centres of a grid covering the whole original image (longest
side = map_size), bilinearly, and writes zeros where the original image was cropped away.
`prepare_maps` does this, and the rounding, for a whole batch on the device thread (one op per
site for all images of a map shape), and for JSON answers it also writes the numbers' text there
(`_json_text`); `build_result` then only assembles one image's answer.
Normalisation is left as the maps define it (see the API reference): gates in [0, 1], GC context
masks multiplied by h*w (uniform = 1), the summary min-max normalised per image.
"""

from __future__ import annotations

import base64
import functools
import io
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
import torch
import torch.nn.functional as F
from PIL import Image

from models import AttentionRecord, spatial_views
from service.imaging import Geometry

__all__ = [
    "ImageMaps",
    "JsonText",
    "MapOptions",
    "MapPlan",
    "build_result",
    "default_map_size",
    "image_result",
    "map_grid",
    "output_size",
    "prepare_maps",
    "to_original",
    "top_k",
]

MapsLevel = Literal["none", "summary", "layers", "all"]
PROB_DECIMALS = 5
MAP_DECIMALS = 3
PNG_COMPRESS_LEVEL = 1
MAX_DEFAULT_MAP_SIZE = 64
MIN_MAP_SIZE = 8
_SPATIAL_KINDS = ("spatial", "context")
# "0.000," ... "1.000,": the text of every 3-decimal number in [0, 1], 6 bytes each
# (`_json_text` writes maps with it)
_TEXT_TABLE = torch.tensor(
    list(b"".join(b"%d.%03d," % divmod(k, 1000) for k in range(1001))), dtype=torch.uint8
).view(1001, 6)
# Viridis anchor colours; the PNG colour scale interpolates linearly between them.
_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 4, 256), np.arange(5), _ANCHORS[:, c]) for c in range(3)], axis=1
).astype(np.uint8)


@dataclass(frozen=True, slots=True)
class MapPlan:
    """One image's share of its batch's map work: the level and format it asked for and where
    its maps go on the original image (`map_grid`)."""

    level: MapsLevel
    grid: torch.Tensor
    mask: torch.Tensor
    map_format: Literal["json", "png"] = "json"

    @classmethod
    def for_image(cls, geometry: Geometry, options: MapOptions) -> MapPlan | None:
        """None when no maps were asked for."""
        if options.maps == "none":
            return None
        grid, mask = map_grid(geometry, options.map_size or default_map_size(geometry))
        return cls(options.maps, grid, mask, options.map_format)


@dataclass(frozen=True, slots=True, eq=False)
class JsonText:
    """One image's map as JSON text already: row `index` of a batch's `_json_text` output,
    and the map's shape. `text()` gives the bytes (copied where it is called, the CPU pool)."""

    batch: np.ndarray
    index: int
    shape: tuple[int, ...]

    def text(self) -> bytes:
        return self.batch[self.index].tobytes()


MapValues = np.ndarray | JsonText


@dataclass(frozen=True, slots=True)
class ImageMaps:
    """One image's maps, resampled and rounded (`prepare_maps`): the summary and, per layer
    entry, its head ("layer", "block", "kind", "derived"), whether it is a spatial view, and
    its values (numbers, or their JSON text for a JSON answer where `_json_text` applies)."""

    summary: MapValues | None
    layers: list[tuple[dict[str, Any], bool, MapValues]]


@dataclass(frozen=True, slots=True)
class MapOptions:
    """What the client asked for: how many classes, which maps, their size and encoding.

    map_size None: `default_map_size` of each image."""

    top_k: int = 5
    maps: MapsLevel = "summary"
    map_size: int | None = None
    map_format: Literal["json", "png"] = "json"


def default_map_size(geometry: Geometry) -> int:
    """The image's longest side, at most 64 and at least 8: a map never has more cells than the
    image has pixels (a 28 x 28 digit gets 28 x 28 maps, pixel for pixel, not 64 x 64 cells
    interpolated from it), and a photo's maps stay small."""
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

    Cached per (geometry, map_size): clients usually send images of a few sizes, and the grid
    is the same for all of them. The returned tensors are shared; callers must not modify them.
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


def to_original(grid_map: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Resample one (h, w) map on the model input grid onto the original image (zeros outside);
    `prepare_maps` does the same for a batch."""
    source = grid_map if grid_map.dtype == torch.float32 else grid_map.float()
    return _resample(source[None], grid, mask[None])[0]


def top_k(probs: torch.Tensor, labels: tuple[str, ...], k: int) -> list[dict[str, Any]]:
    """The k most probable classes, highest first (ties: lower index first), rounded.

    numpy, not torch.topk: no GIL hand-over in the CPU pool (see `to_original`)."""
    values = np.asarray(probs.numpy(), dtype=np.float64)
    indices = np.argsort(-values, kind="stable")[: min(k, values.size)]
    return [
        {"label": labels[i], "index": i, "probability": round(float(values[i]), PROB_DECIMALS)}
        for i in indices.tolist()
    ]


def _entry(
    values: MapValues, fmt: str, head: dict[str, Any] | None = None, spatial: bool = True
) -> dict[str, Any]:
    """{"shape", "data"} for JSON numbers, or {"shape", "png", "range"} for 2-D PNG output
    (colour range from `_value_range` of a layer's `head`; [0, 1] for the summary, no head)."""
    entry: dict[str, Any] = {"shape": list(values.shape)}
    if isinstance(values, JsonText):
        entry["data"] = orjson.Fragment(values.text())
    elif fmt == "png" and values.ndim == 2:
        value_range = (0.0, 1.0) if head is None else _value_range(head, spatial, values)
        entry["png"] = _png(values, value_range)
        entry["range"] = [round(v, MAP_DECIMALS) for v in value_range]
    else:
        entry["data"] = values
    return entry


def _png(values: np.ndarray, value_range: tuple[float, float]) -> str:
    """Base64 PNG heatmap: `value_range` spread over the viridis-like colour scale.

    zlib level 1 (`PNG_COMPRESS_LEVEL`) rather than Pillow's default 6: the deflate step was
    most of the time, and level 1 costs about 15 % more bytes (README "Benchmarks")."""
    low, high = value_range
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    index = np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(_LUT[index], mode="RGB").save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _value_range(head: dict[str, Any], spatial: bool, values: np.ndarray) -> tuple[float, float]:
    """PNG colour range: [0, 1] for gates and shares; [0, max] for GC's h*w-scaled context
    mask; [min, max] for GC's raw tensors."""
    if spatial and head["kind"] == "context":
        return 0.0, max(1.0, float(values.max()))
    if not spatial and head["block"] == "gc":
        return float(values.min()), float(values.max())
    return 0.0, 1.0


def _layer_head(record: AttentionRecord) -> dict[str, Any]:
    return {
        "layer": record.site,
        "block": record.block,
        "kind": record.kind,
        "derived": record.derived,
    }


def _resample(maps: torch.Tensor, grids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(G, h, w) maps on the model input grid -> (G, rows, cols) on the original images, with
    `map_grid`'s grids (G, rows, cols, 2) and masks (G, rows, cols)."""
    sampled = F.grid_sample(maps[:, None], grids, padding_mode="border", align_corners=False)
    return sampled[:, 0].mul_(masks)


def _rounded(values: torch.Tensor) -> torch.Tensor:
    """Map numbers rounded to 3 decimals, the way numpy.round does it (scale, round half to
    even, unscale, in float64), no -0.0; then float32 where that prints the same text (every
    value below 2**14 in magnitude: the float32 spacing there is under 0.001), which orjson
    writes about a quarter faster."""
    return _unscaled(torch.round(values.double() * 1000.0))  # 10 ** MAP_DECIMALS


def _unscaled(scaled: torch.Tensor) -> torch.Tensor:
    """`_rounded`'s second half: numbers times 1000, already rounded, back to numbers."""
    rounded = scaled / 1000.0 + 0.0  # TorchScript reads no module globals: 10 ** MAP_DECIMALS
    if rounded.numel() > 0 and bool(rounded.abs().max() < 16384.0):  # 2 ** 14
        return rounded.float()
    return rounded


def _json_text(scaled: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(G, n) or (G, rows, cols) integers in [0, 1000] (map numbers times 1000) -> (G, L)
    uint8: each image's JSON array, "[0.120,0.004]" or "[[0.120,0.004],[1.000,0.000]]".

    Every number is written with exactly three decimals, a row of `table` (`_TEXT_TABLE`, 6
    bytes, the comma included): the same values as the shortest form orjson writes ("0.12"),
    a few trailing zeros longer, for a fraction of its time (`python -m bench.mapwork`). The
    layout is fixed, so a whole group of images is written by one table lookup and a few
    strided copies, without the GIL."""
    images = scaled.shape[0]
    nested = scaled.dim() == 3
    lines = scaled if nested else scaled.unsqueeze(1)
    rows, cols = lines.shape[1], lines.shape[2]
    width = cols * 6 + 2 if nested else cols * 6  # a row: "[" numbers "]" "," when nested
    out = torch.empty((images, 1 + rows * width), dtype=torch.uint8)
    body = out[:, 1:].view(images, rows, width)
    numbers = table.index_select(0, lines.reshape(-1)).view(images, rows, cols * 6)
    first = 1 if nested else 0
    body.narrow(2, first, cols * 6).copy_(numbers)
    # fill_, not `x[...] = 91`: TorchScript makes a tensor of the 91 and converts it each time
    if nested:
        body.select(2, 0).fill_(91)  # "["
        body.select(2, width - 2).fill_(93)  # "]" over the row's last comma
        body.select(2, width - 1).fill_(44)  # ","
    out.select(1, 0).fill_(91)  # "["
    out.select(1, out.shape[1] - 1).fill_(93)  # "]" over the last comma
    return out


def _finished(values: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    """A group's map (G, ...) rounded to 3 decimals: as JSON text (`_json_text`) when the text
    `table` is given and every number lies in [0, 1] (gates, shares, summaries) in one or two
    dimensions per image, otherwise as numbers (`_rounded`)."""
    scaled = torch.round(values.double() * 1000.0)
    if table is not None and scaled.dim() in (2, 3) and scaled.numel() > 0:
        low, high = torch.aminmax(scaled)
        if bool(low >= 0.0) and bool(high <= 1000.0):
            return _json_text(scaled.int(), table)
    return _unscaled(scaled)


def _group_maps(
    spatial: list[torch.Tensor],
    context: list[bool],
    raw: list[torch.Tensor],
    coord: list[bool],
    members: list[int] | None,
    grid_list: list[torch.Tensor],
    mask_list: list[torch.Tensor],
    text_table: torch.Tensor | None,
) -> tuple[list[torch.Tensor], list[list[int]], list[list[torch.Tensor]]]:
    """One group's maps, rounded: each spatial view ((N, 1, h, w) records or the (N, H, W)
    summary; GC context masks times h*w so uniform = 1) resampled onto the original images
    with their `map_grid` grids and masks, then each raw tensor at native resolution
    (coordinate gates lose their singleton axis). `members` are the group's images in the
    batch (None: all of them). With the `text_table` (`_TEXT_TABLE`, for a JSON answer), maps
    go out as JSON text where `_finished` can write them.

    Returns the maps (numbers, or uint8 text), each map's shape per image, and the input
    lists. Run as TorchScript (`_group_maps_graph`), so the whole group, joining the grids
    included, is one call that holds no GIL: op by op from Python, the device thread gave the
    GIL back and waited for it again dozens of times per batch, behind the event loop and the
    CPU pool. The inputs are returned so that their last C++ references drop after the call,
    under the GIL, not inside it (see service.graph)."""
    index: torch.Tensor | None = None if members is None else torch.tensor(members)
    grids = torch.cat(grid_list)
    masks = torch.stack(mask_list)
    maps: list[torch.Tensor] = []
    for i in range(len(spatial)):
        view = spatial[i] if index is None else spatial[i].index_select(0, index)
        view = view.float()
        if view.dim() == 4:
            view = view[:, 0]
        if context[i]:
            view = view * (view.shape[-2] * view.shape[-1])
        maps.append(_resample(view, grids, masks))
    for j in range(len(raw)):
        tensor = raw[j] if index is None else raw[j].index_select(0, index)
        tensor = tensor.float()
        if coord[j]:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
        maps.append(tensor)
    out = [_finished(m, text_table) for m in maps]
    shapes = [m.shape[1:] for m in maps]
    return out, shapes, [spatial, raw, grid_list, mask_list]


def _script(fn: Any) -> Any:
    """`torch.jit.script`, without the deprecation warning torch 2.13 gives for it: TorchScript
    is what runs a whole function without the GIL here, as for the traced models
    (`service.graph`). The functions it calls are compiled with it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(fn)


_group_maps_graph = _script(_group_maps)


def prepare_maps(
    records: list[AttentionRecord], summary: torch.Tensor | None, plans: list[MapPlan | None]
) -> list[ImageMaps | None]:
    """Every image's maps for a whole batch (records and summary with a batch dimension),
    resampled onto each original image and rounded, ready to encode; None where no plan.

    Images that share a map shape, level and format are done together, in one `_group_maps`
    call: one grid_sample and one rounding per site for all of them, not one per image (and
    for JSON answers one text writing, `_json_text`). Runs on the device thread after the
    forward.
    """
    groups: dict[tuple[str, str, tuple[int, ...]], list[int]] = {}  # -> the group's images
    for i, plan in enumerate(plans):
        if plan is not None:
            key = (plan.level, plan.map_format, tuple(plan.mask.shape))
            groups.setdefault(key, []).append(i)
    result: list[ImageMaps | None] = [None] * len(plans)
    if not groups:
        return result
    views = {id(r) for r in spatial_views(records)}
    for (level, fmt, _), members in groups.items():
        subset = None if members == list(range(len(plans))) else members
        grids = [plans[i].grid for i in members]  # type: ignore[union-attr]
        masks = [plans[i].mask for i in members]  # type: ignore[union-attr]
        chosen = [r for r in records if level in ("layers", "all") and id(r) in views]
        raw = [r for r in records if level == "all" and r.kind not in _SPATIAL_KINDS]
        view_tensors = [r.tensor for r in chosen]
        context = [r.kind == "context" for r in chosen]
        if summary is not None:
            view_tensors.insert(0, summary)
            context.insert(0, False)
        coord = [r.kind in ("coord_h", "coord_w") for r in raw]
        tensors, shapes, _ = _group_maps_graph(
            view_tensors,
            context,
            [r.tensor for r in raw],
            coord,
            subset,
            grids,
            masks,
            _TEXT_TABLE if fmt == "json" else None,
        )
        arrays = [(t.numpy(), tuple(shape)) for t, shape in zip(tensors, shapes, strict=True)]
        summaries = arrays.pop(0) if summary is not None else None
        mapped = dict(zip([id(r) for r in chosen + raw], arrays, strict=True))
        layers = [
            (_layer_head(r), id(r) in views, mapped[id(r)]) for r in records if id(r) in mapped
        ]
        for g, i in enumerate(members):
            result[i] = ImageMaps(
                None if summaries is None else _image_values(summaries, g),
                [(head, spatial, _image_values(values, g)) for head, spatial, values in layers],
            )
    return result


def _image_values(group: tuple[np.ndarray, tuple[int, ...]], g: int) -> MapValues:
    """Image `g`'s share of a group's map (`_group_maps` output and its shape per image)."""
    array, shape = group
    return JsonText(array, g, shape) if array.dtype == np.uint8 else array[g]


def build_result(
    probs: torch.Tensor,
    maps: ImageMaps | None,
    geometry: Geometry,
    labels: tuple[str, ...],
    options: MapOptions,
) -> dict[str, Any]:
    """The response object of one image, from its probabilities (K,) and `prepare_maps`'s
    output for it (None: maps="none")."""
    result: dict[str, Any] = {
        "predictions": top_k(probs, labels, options.top_k),
        "image": {"width": geometry.width, "height": geometry.height},
        "attention": None,
    }
    if options.maps == "none" or maps is None:
        return result
    fmt = options.map_format
    attention: dict[str, Any] = {"summary": None}
    if maps.summary is not None:
        attention["summary"] = _entry(maps.summary, fmt)
    if options.maps in ("layers", "all"):
        attention["layers"] = [
            head | _entry(values, fmt, head, spatial) for head, spatial, values in maps.layers
        ]
    result["attention"] = attention
    return result


def image_result(
    probs: torch.Tensor,
    records: list[AttentionRecord],
    summary: torch.Tensor | None,
    geometry: Geometry,
    labels: tuple[str, ...],
    options: MapOptions,
) -> dict[str, Any]:
    """`build_result` for a single image's outputs (records and summary with a batch
    dimension of 1), maps prepared on the spot."""
    (maps,) = prepare_maps(records, summary, [MapPlan.for_image(geometry, options)])
    return build_result(probs, maps, geometry, labels, options)
