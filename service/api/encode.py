"""/v1 answers: `ImageResult`s written as the JSON clients read (top-k, rounded maps, PNG maps).

Runs in the CPU pool (`Pipeline.offload`): a maps=all answer is 100-200 KB of numbers.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from PIL import Image

from service.api.schemas import PredictOptions
from service.forward import ImageResult
from service.maps import LayerMap

__all__ = ["encode_compare", "encode_predict", "image_answer", "top_k"]

PROB_DECIMALS = 5
MAP_DECIMALS = 3
PNG_COMPRESS_LEVEL = 1
# Viridis anchor colours; the PNG colour scale interpolates linearly between them.
_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 4, 256), np.arange(5), _ANCHORS[:, c]) for c in range(3)], axis=1
).astype(np.uint8)


def encode_predict(
    model: str, results: list[ImageResult], labels: Sequence[str], options: PredictOptions
) -> bytes:
    """The body of a predict answer."""
    answers = [image_answer(r, labels, options) for r in results]
    return _dumps({"model": model, "results": answers})


def encode_compare(
    models: list[str],
    results: list[ImageResult],
    labels: list[Sequence[str]],
    options: PredictOptions,
) -> bytes:
    """The body of a compare answer: one result per model, each naming its model."""
    answers = [
        {"model": name, **image_answer(result, model_labels, options)}
        for name, result, model_labels in zip(models, results, labels, strict=True)
    ]
    return _dumps({"models": models, "results": answers})


def _dumps(content: Any) -> bytes:
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def top_k(probs: np.ndarray, labels: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The k most probable classes, highest first (ties: lower index first), rounded."""
    values = probs.astype(np.float64)
    indices = np.argsort(-values, kind="stable")[: min(k, values.size)]
    return [
        {"label": labels[i], "index": i, "probability": round(float(values[i]), PROB_DECIMALS)}
        for i in indices.tolist()
    ]


def image_answer(
    result: ImageResult, labels: Sequence[str], options: PredictOptions
) -> dict[str, Any]:
    """One image's answer object (`schemas.ImageAnswer`)."""
    geometry = result.geometry
    answer: dict[str, Any] = {
        "predictions": top_k(result.probs, labels, options.top_k),
        "image": None if geometry is None else {"width": geometry.width, "height": geometry.height},
        "attention": None,
    }
    maps = result.maps
    if options.maps == "none" or maps is None:
        return answer
    png = options.map_format == "png"
    attention: dict[str, Any] = {
        "summary": None if maps.summary is None else _map_entry(maps.summary, png)
    }
    if options.maps in ("layers", "all"):
        attention["layers"] = [_layer_entry(layer, png) for layer in maps.layers]
    answer["attention"] = attention
    return answer


def _layer_entry(layer: LayerMap, png: bool) -> dict[str, Any]:
    head = {"layer": layer.layer, "block": layer.block, "kind": layer.kind}
    return {**head, "derived": layer.derived, **_map_entry(layer.values, png)}


def _map_entry(values: np.ndarray, png: bool) -> dict[str, Any]:
    """{"shape", "data"} with numbers rounded to 3 decimals, or for a 2-D map in PNG format
    {"shape", "png", "range"}."""
    entry: dict[str, Any] = {"shape": list(values.shape)}
    if png and values.ndim == 2:
        low = min(0.0, float(values.min(initial=0.0)))
        high = max(1.0, float(values.max(initial=0.0)))
        entry["png"] = _png(values, low, high)
        entry["range"] = [round(low, MAP_DECIMALS), round(high, MAP_DECIMALS)]
    else:
        entry["data"] = np.round(values.astype(np.float64), MAP_DECIMALS) + 0.0  # no -0.0
    return entry


def _png(values: np.ndarray, low: float, high: float) -> str:
    """Base64 PNG heatmap: [low, high] spread over the viridis colour scale (zlib level 1:
    deflate was most of the time, and level 1 costs few bytes on maps this small)."""
    index = np.clip(np.rint((values - low) / (high - low) * 255), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(_LUT[index], mode="RGB").save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return base64.b64encode(buffer.getvalue()).decode("ascii")
