"""Image bytes -> validated Pillow image -> normalised tensor, keeping the geometry of each step.

Decoding is restricted to a fixed set of raster formats (Pillow can open far more, some of them
unsafe), refuses images larger than the configured pixel budget before any pixel is decoded, and
applies the EXIF orientation. Preprocessing follows the model's DataConfig with Pillow and torch
only; the returned `Geometry` records the resize and crop so attention maps can be mapped back.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from models import DataConfig
from service.errors import InvalidImage, PayloadTooLarge

__all__ = [
    "ACCEPTED_IMAGE_TYPES",
    "Geometry",
    "Prepared",
    "decode_image",
    "prepare",
    "preprocess",
]

# Content type -> Pillow format name; decoding accepts exactly these formats.
ACCEPTED_IMAGE_TYPES: dict[str, str] = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/gif": "GIF",
    "image/tiff": "TIFF",
}
_FORMATS = tuple(sorted(set(ACCEPTED_IMAGE_TYPES.values())))
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where the model input came from: original size, resized size and the crop box in it."""

    width: int
    height: int
    resized_width: int
    resized_height: int
    crop_left: int
    crop_top: int
    crop_width: int
    crop_height: int

    @property
    def scale_x(self) -> float:
        return self.resized_width / self.width

    @property
    def scale_y(self) -> float:
        return self.resized_height / self.height


@dataclass(frozen=True, slots=True)
class Prepared:
    """One decoded image ready for the model: input tensor (C, H, W) and its geometry."""

    tensor: torch.Tensor
    geometry: Geometry


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode `data` as one of the accepted formats, oriented upright, refusing oversized images."""
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=_FORMATS)
        _check_pixels(image.size, max_pixels)
        image.load()
        return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidImage(
            f"cannot identify the image; accepted formats: {', '.join(_FORMATS)}"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"cannot decode the image: {exc}") from None


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InvalidImage(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{max_pixels}. Hint: downscale it before sending."
        )


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert to "L" or "RGB": transparency is composited over white, 16-bit data rescaled."""
    if image.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float64)
        scale = 257.0 if array.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(array / scale, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if array.max(initial=0) <= 1.0:
            array = array * 255.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" or image.mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == mode else image.convert(mode)


def plan_geometry(width: int, height: int, config: DataConfig) -> Geometry:
    """Resize so the crop fits with margin 1/crop_pct (shorter side to H/crop_pct), centre crop."""
    _, out_h, out_w = config.input_size
    target_h = math.floor(out_h / config.crop_pct)
    target_w = math.floor(out_w / config.crop_pct)
    scale = max(target_h / height, target_w / width)
    resized_w = max(target_w, int(width * scale))
    resized_h = max(target_h, int(height * scale))
    return Geometry(
        width=width,
        height=height,
        resized_width=resized_w,
        resized_height=resized_h,
        crop_left=round((resized_w - out_w) / 2.0),
        crop_top=round((resized_h - out_h) / 2.0),
        crop_width=out_w,
        crop_height=out_h,
    )


def preprocess(image: Image.Image, config: DataConfig) -> Prepared:
    """Resize, centre-crop and normalise `image` per `config` into a float32 (C, H, W) tensor."""
    channels = config.input_size[0]
    image = to_mode(image, "L" if channels == 1 else "RGB")
    geometry = plan_geometry(image.width, image.height, config)
    resized = image.resize(
        (geometry.resized_width, geometry.resized_height),
        resample=_RESAMPLE[config.interpolation],
    )
    left, top = geometry.crop_left, geometry.crop_top
    cropped = resized.crop((left, top, left + geometry.crop_width, top + geometry.crop_height))
    array = np.asarray(cropped, dtype=np.float32) / np.float32(255.0)
    if array.ndim == 2:
        array = array[:, :, None]
    # numpy, not torch: this runs in the CPU pool, where each torch op would give the GIL back
    # and then wait for it behind the event loop; numpy keeps it for arrays this small.
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    normalised = np.ascontiguousarray(((array - mean) / std).transpose(2, 0, 1))
    return Prepared(tensor=torch.from_numpy(normalised), geometry=geometry)


def prepare(data: bytes, configs: list[DataConfig], *, max_pixels: int) -> list[Prepared]:
    """Decode once and preprocess for each data config (the compare route needs several)."""
    image = decode_image(data, max_pixels=max_pixels)
    try:
        return [preprocess(image, config) for config in configs]
    except (OSError, ValueError) as exc:
        raise InvalidImage(f"cannot convert the {image.mode} image for the model: {exc}") from None
