"""Attention maps as pictures: a map blended over the image it covers, with a colour-bar legend,
and a grid of such panels.

The one renderer behind the /v1 `map_format=overlay` answer, the Python client and
`attnserve predict`; the PNG heatmaps of `map_format=png` use its colour scales too. The colour
tables are the published 256-entry ones, read from `static/colormaps.json`, the file the web
viewer loads as well (written by docs/make_colormaps.py).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service.imaging import to_mode

__all__ = [
    "COLORMAPS",
    "DEFAULT_COLORMAP",
    "DEFAULT_OPACITY",
    "DIVERGING",
    "blend",
    "colorize",
    "fit_size",
    "grid",
    "legend_height",
    "lut",
    "overlay",
    "tables",
    "value_range",
]

TABLES_PATH = Path(__file__).parent / "static" / "colormaps.json"
COLORMAPS = ("viridis", "inferno", "berlin")
DIVERGING = frozenset({"berlin"})
DEFAULT_COLORMAP = "viridis"
DEFAULT_OPACITY = 0.6
_BACKGROUND = (255, 255, 255)
_INK = (30, 30, 30)


@functools.cache
def tables() -> dict[str, np.ndarray]:
    """The published tables as read from the file: name -> (256, 3) float64 RGB in [0, 1]."""
    data = json.loads(TABLES_PATH.read_text())
    return {name: np.asarray(data[name], dtype=np.float64) for name in COLORMAPS}


@functools.cache
def lut(colormap: str) -> np.ndarray:
    """(256, 3) uint8 RGB of `colormap` (ValueError naming the known ones if unknown)."""
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colour scale {colormap!r}; known: {', '.join(COLORMAPS)}")
    return np.rint(tables()[colormap] * 255.0).astype(np.uint8)


def value_range(values: np.ndarray, colormap: str = DEFAULT_COLORMAP) -> tuple[float, float]:
    """The values at the two ends of the scale: [0, 1] stretched to hold the map (gates and the
    summary span [0, 1], GC context masks [0, max]); a diverging scale is made symmetric about
    0, so its middle colour is 0."""
    low = min(0.0, float(values.min(initial=0.0)))
    high = max(1.0, float(values.max(initial=0.0)))
    if colormap in DIVERGING:
        bound = max(-low, high)
        return -bound, bound
    return low, high


def colorize(values: np.ndarray, colormap: str, low: float, high: float) -> np.ndarray:
    """Values (any shape) -> uint8 RGB (..., 3): [low, high] spread over the 256 colours."""
    index = np.clip(np.rint((values - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)
    return lut(colormap)[index]


def fit_size(width: int, height: int, max_side: int, min_side: int = 0) -> tuple[int, int]:
    """(width, height) scaled down so the longest side is at most `max_side`, or up so it is
    at least `min_side`; the aspect ratio is kept."""
    longest = max(width, height)
    scale = min(1.0, max_side / longest)
    if longest * scale < min_side:
        scale = min_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def blend(
    image: Image.Image,
    values: np.ndarray,
    *,
    colormap: str = DEFAULT_COLORMAP,
    opacity: float = DEFAULT_OPACITY,
    span: tuple[float, float] | None = None,
) -> Image.Image:
    """`image` (RGB, same size) with the 2-D map `values` over it in colour: the map covers the
    whole image (as every spatial map of an answer does) and is resampled bilinearly at the
    pixel centres. Opacity 0 gives the image's pixels, 1 the colour-scale image."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must lie in [0, 1], got {opacity}")
    low, high = span if span is not None else value_range(values, colormap)
    base = to_mode(image, "RGB")
    field = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    resampled = np.asarray(field.resize(base.size, Image.Resampling.BILINEAR))
    colours = colorize(resampled, colormap, low, high).astype(np.float32)
    pixels = np.asarray(base, dtype=np.float32)
    mixed = pixels + np.float32(opacity) * (colours - pixels)
    return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8), mode="RGB")


def overlay(
    image: Image.Image,
    values: np.ndarray | None,
    *,
    colormap: str = DEFAULT_COLORMAP,
    opacity: float = DEFAULT_OPACITY,
    max_side: int = 512,
    min_side: int = 0,
    legend: bool = True,
) -> Image.Image:
    """The map blended over the image at the image's size (capped to `max_side`, raised to
    `min_side`), with a colour bar under it giving the values at the scale's two ends. Without
    a map (a model without attention) the image alone, the legend strip saying so."""
    size = fit_size(image.width, image.height, max_side, min_side)
    base = to_mode(image, "RGB")
    if base.size != size:
        base = base.resize(size, Image.Resampling.LANCZOS)
    if values is None:
        return _with_legend(base, colormap, None) if legend else base
    span = value_range(values, colormap)
    picture = blend(base, values, colormap=colormap, opacity=opacity, span=span)
    return _with_legend(picture, colormap, span) if legend else picture


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _legend_layout(width: int) -> tuple[int, int, int]:
    """(font size, padding, bar height) of the legend under a picture `width` pixels wide."""
    font_size = int(np.clip(round(width / 16), 10, 16))
    return font_size, max(2, font_size // 4), max(4, font_size // 2)


def legend_height(width: int) -> int:
    """Height in pixels of the colour-bar strip that `overlay` puts under a picture."""
    font_size, pad, bar_height = _legend_layout(width)
    return pad * 3 + bar_height + font_size


def _with_legend(
    picture: Image.Image, colormap: str, span: tuple[float, float] | None
) -> Image.Image:
    """`picture` above a colour bar labelled with the values at its ends."""
    width = picture.width
    font_size, pad, bar_height = _legend_layout(width)
    strip = Image.new("RGB", (width, legend_height(width)), _BACKGROUND)
    draw = ImageDraw.Draw(strip)
    font = _font(font_size)
    text_y = pad * 2 + bar_height
    if span is None:
        draw.text((pad, text_y), "no attention map", fill=_INK, font=font)
    else:
        bar = colorize(np.linspace(0.0, 1.0, max(1, width - 2 * pad)), colormap, 0.0, 1.0)
        strip.paste(Image.fromarray(np.repeat(bar[None], bar_height, axis=0), "RGB"), (pad, pad))
        low, high = (f"{v:.3g}" for v in span)
        draw.text((pad, text_y), low, fill=_INK, font=font)
        draw.text((width - pad, text_y), high, fill=_INK, font=font, anchor="ra")
    out = Image.new("RGB", (width, picture.height + strip.height), _BACKGROUND)
    out.paste(picture, (0, 0))
    out.paste(strip, (0, picture.height))
    return out


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """`text`, shortened with an ellipsis until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def grid(panels: Sequence[Image.Image], titles: Sequence[str], columns: int = 4) -> Image.Image:
    """One image with the panels in rows of `columns`, each under its title."""
    if len(panels) != len(titles) or not panels:
        raise ValueError("grid needs one title per panel, and at least one panel")
    cell_w = max(p.width for p in panels)
    cell_h = max(p.height for p in panels)
    font_size = int(np.clip(round(cell_w / 14), 10, 16))
    font = _font(font_size)
    pad = 6
    title_h = font_size + pad
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    out = Image.new(
        "RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + title_h + pad) + pad), _BACKGROUND
    )
    draw = ImageDraw.Draw(out)
    for i, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        x = pad + (i % cols) * (cell_w + pad)
        y = pad + (i // cols) * (cell_h + title_h + pad)
        draw.text((x, y), _fit_text(draw, title, font, cell_w), fill=_INK, font=font)
        out.paste(to_mode(panel, "RGB"), (x, y + title_h))
    return out
