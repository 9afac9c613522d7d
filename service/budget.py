"""Per-request budgets, checked before any work is done: map cells, and the answer's size.

A request asks for `images x models` results, each with the maps of its level. Its work is
counted in map cells (numbers of attention maps to compute and write):

    cells per result = 0                                 maps=none
                     = S^2                               maps=summary
                     = (1 + V) * S^2                     maps=layers
                     = (1 + V) * S^2 + R                 maps=all

with S the map size (the request's `map_size`, else the default cap of 64), V the model's
spatial views (one per attention site) and R its native record values per image. The answer's
size is estimated from the same counts: `ANSWER_OVERHEAD` plus the predictions per result,
`JSON_CELL_BYTES` per number written as JSON, `PNG_CELL_BYTES` per pixel of a PNG map, and for
map_format=overlay the overlay image (at most `overlay_max_side^2` pixels). Both are upper
bounds, so a request under them never grows past them while it runs (docs/api.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import PayloadTooLarge
from service.maps import MAX_DEFAULT_MAP_SIZE, MapRequest

__all__ = [
    "PREDICTION_BYTES",
    "TENSOR_VALUE_BYTES",
    "MapCounts",
    "ResultCost",
    "check_budget",
    "result_cost",
]

JSON_CELL_BYTES = 8  # "-0.123," or "12.345," at most, for the three decimals written
PNG_CELL_BYTES = 4  # an RGB pixel, uncompressed, in base64
PREDICTION_BYTES = 160  # one {"label", "index", "probability"} entry with a long label
ANSWER_OVERHEAD = 512  # the result's keys, image size and per-map fields


@dataclass(frozen=True, slots=True)
class MapCounts:
    """What a model's maps amount to per image: `views`, spatial views placed on the image at
    maps=layers; `native`, the values of all its records at native resolution (maps=all)."""

    views: int
    native: int


@dataclass(frozen=True, slots=True)
class ResultCost:
    """One result's map cells (on-image cells and native values) and answer bytes."""

    cells: int
    answer_bytes: int


TENSOR_VALUE_BYTES = 16  # a /v2 output value: "-1.2345678e-05," in JSON, 4 bytes binary
CELL_BYTES = {
    "json": JSON_CELL_BYTES,
    "png": PNG_CELL_BYTES,
    "overlay": PNG_CELL_BYTES,
    "tensor": TENSOR_VALUE_BYTES,
}
"""Bytes per on-image map cell by how maps are written: v1 json (three decimals), png, overlay
(png plus the summary drawn over the image), or /v2 tensors (full float32, JSON or binary)."""


def result_cost(
    counts: MapCounts,
    maps: MapRequest,
    *,
    head_bytes: int,
    image_format: str = "json",
    overlay_side: int = 0,
) -> ResultCost:
    """The cost of one image's result from one model. `head_bytes`: its predictions' share of
    the answer; `image_format`: a key of `CELL_BYTES`."""
    size = maps.size or MAX_DEFAULT_MAP_SIZE
    placed = {"none": 0, "summary": 1, "layers": 1 + counts.views, "all": 1 + counts.views}
    on_image = placed[maps.level] * size * size
    native = counts.native if maps.level == "all" else 0
    per_cell = CELL_BYTES[image_format]
    per_native = TENSOR_VALUE_BYTES if image_format == "tensor" else JSON_CELL_BYTES
    extra = PNG_CELL_BYTES * overlay_side**2 if image_format == "overlay" and on_image else 0
    answer = ANSWER_OVERHEAD + head_bytes + on_image * per_cell + extra + native * per_native
    return ResultCost(on_image + native, answer)


def check_budget(
    costs: list[ResultCost], images: int, *, max_cells: int, max_answer_bytes: int
) -> int:
    """413 when `images` images through results costing `costs` (one per model) exceed the
    work budget or the answer-size budget; the detail gives both figures and the formula.
    Returns the answer's size bound."""
    cells = images * sum(c.cells for c in costs)
    if cells > max_cells:
        raise PayloadTooLarge(
            f"the request asks for {cells} map cells ({images} image(s) x {len(costs)} "
            f"model(s) x the cells of each result), more than the budget of {max_cells}. "
            "Hint: ask for fewer images or models, a smaller map_size, or a lower maps level."
        )
    size = images * sum(c.answer_bytes for c in costs)
    if size > max_answer_bytes:
        raise PayloadTooLarge(
            f"the answer would take up to {size} bytes, more than the response budget of "
            f"{max_answer_bytes} bytes. Hint: ask for fewer images or models, a smaller "
            "map_size, a lower maps level, or map_format=png."
        )
    return size
