"""/v1 answers: `ImageResult`s written as the JSON clients read (top-k, rounded maps, PNG maps,
the summary over the image).

Runs in the CPU pool (`Pipeline.offload`): a maps=all answer is 100-200 KB of numbers.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from PIL import Image

from models import RECORD_KINDS
from service.api.schemas import PredictOptions
from service.forward import ImageResult
from service.imaging import decode_image
from service.maps import LayerMap
from service.overlay import colorize, overlay, value_range

__all__ = ["Sources", "encode_compare", "encode_predict", "image_answer", "top_k"]

PROB_DECIMALS = 5
MAP_DECIMALS = 3
PNG_COMPRESS_LEVEL = 1


@dataclass(frozen=True, slots=True)
class Sources:
    """The request's encoded images, which map_format=overlay draws under the summary (decoded
    again here, in the CPU pool, only for that format); `max_side`: the overlay's cap."""

    images: list[bytes]
    max_side: int

    def pictures(self, options: PredictOptions) -> list[Image.Image | None]:
        if options.map_format != "overlay" or options.maps == "none":
            return [None] * len(self.images)
        # Already checked against the pixel limit when the pipeline decoded them.
        return [decode_image(data, max_pixels=2**62) for data in self.images]


def encode_predict(
    model: str,
    results: list[ImageResult],
    labels: Sequence[str],
    options: PredictOptions,
    sources: Sources | None = None,
) -> bytes:
    """The body of a predict answer."""
    pictures = sources.pictures(options) if sources else [None] * len(results)
    cap = sources.max_side if sources else 0
    answers = [
        image_answer(r, labels, options, picture, cap)
        for r, picture in zip(results, pictures, strict=True)
    ]
    return _dumps({"model": model, "results": answers})


def encode_compare(
    models: list[str],
    results: list[ImageResult],
    labels: list[Sequence[str]],
    options: PredictOptions,
    sources: Sources | None = None,
) -> bytes:
    """The body of a compare answer: one result per model, each naming its model."""
    picture = sources.pictures(options)[0] if sources else None
    cap = sources.max_side if sources else 0
    answers = [
        {"model": name, **image_answer(result, model_labels, options, picture, cap)}
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
    result: ImageResult,
    labels: Sequence[str],
    options: PredictOptions,
    picture: Image.Image | None = None,
    max_side: int = 0,
) -> dict[str, Any]:
    """One image's answer object (`schemas.ImageAnswer`); with map_format=overlay and the
    decoded `picture`, the summary also carries it with the map over it (`service.overlay`)."""
    geometry = result.geometry
    answer: dict[str, Any] = {
        "predictions": top_k(result.probs, labels, options.top_k),
        "image": None if geometry is None else {"width": geometry.width, "height": geometry.height},
        "attention": None,
    }
    maps = result.maps
    if options.maps == "none" or maps is None:
        return answer
    png = options.colormap if options.map_format != "json" else None
    summary = None if maps.summary is None else _map_entry(maps.summary, png)
    if summary is not None and picture is not None:
        drawn = overlay(picture, maps.summary, colormap=options.colormap, max_side=max_side)
        summary["overlay"] = _png_base64(drawn)
    attention: dict[str, Any] = {"summary": summary}
    if options.maps in ("layers", "all"):
        attention["layers"] = [_layer_entry(layer, png) for layer in maps.layers]
    answer["attention"] = attention
    return answer


def _layer_entry(layer: LayerMap, png: str | None) -> dict[str, Any]:
    head = {
        "layer": layer.layer,
        "block": layer.block,
        "kind": layer.kind,
        "derived": layer.derived,
    }
    picture = RECORD_KINDS[layer.kind].picture
    if picture == "image" and png:
        return {**head, **_image_entry(layer.values)}
    return {**head, **_map_entry(layer.values, png if picture == "map" else None)}


def _image_entry(values: np.ndarray) -> dict[str, Any]:
    """An image record (C, h, w) as a PNG image: grey for one channel, RGB for three, the
    values' [min, max] spread over 0-255 and given as "range"."""
    low, high = float(values.min()), float(values.max())
    pixels = np.rint((values - low) / max(high - low, 1e-12) * 255).clip(0, 255).astype(np.uint8)
    mode = "RGB" if pixels.shape[0] == 3 else "L"
    image = Image.fromarray(np.moveaxis(pixels, 0, -1) if mode == "RGB" else pixels[0], mode=mode)
    return {
        "shape": list(values.shape),
        "png": _png_base64(image),
        "range": [round(low, MAP_DECIMALS), round(high, MAP_DECIMALS)],
    }


def _map_entry(values: np.ndarray, png: str | None) -> dict[str, Any]:
    """{"shape", "data"} with numbers rounded to 3 decimals, or for a 2-D map in PNG format
    (`png`: the colour scale) {"shape", "png", "range"}."""
    entry: dict[str, Any] = {"shape": list(values.shape)}
    if png and values.ndim == 2:
        low, high = value_range(values, png)
        entry["png"] = _png_base64(Image.fromarray(colorize(values, png, low, high), mode="RGB"))
        entry["range"] = [round(low, MAP_DECIMALS), round(high, MAP_DECIMALS)]
    else:
        entry["data"] = np.round(values.astype(np.float64), MAP_DECIMALS) + 0.0  # no -0.0
    return entry


def _png_base64(image: Image.Image) -> str:
    """Base64 PNG (zlib level 1: deflate was most of the time of a heatmap, and level 1 costs
    few bytes on maps this small)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
