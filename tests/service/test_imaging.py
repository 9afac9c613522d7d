"""Decoding, validation and preprocessing of real images (no torchvision, geometry kept)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models import DataConfig
from service.errors import InvalidImage, PayloadTooLarge
from service.imaging import decode_image, plan_geometry, prepare, preprocess, to_mode

LIMIT = 40_000_000
DIGITS = DataConfig((1, 64, 64), (0.5,), (0.5,), "bilinear", 1.0, tuple("0123456789"))
RGB = DataConfig((3, 32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875)


def save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_accepted_formats_decode(photos: dict, fmt: str) -> None:
    data = save(Image.fromarray(photos["chelsea"]), fmt)
    image = decode_image(data, max_pixels=LIMIT)
    assert image.size == (451, 300)


def test_other_formats_and_garbage_are_refused(photos: dict) -> None:
    ico = save(Image.fromarray(photos["chelsea"]).resize((32, 32)), "ICO")
    with pytest.raises(InvalidImage, match="accepted formats"):
        decode_image(ico, max_pixels=LIMIT)
    with pytest.raises(InvalidImage, match="accepted formats"):
        decode_image(b"%PDF-1.4 not an image", max_pixels=LIMIT)
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(b"", max_pixels=LIMIT)


def test_truncated_file_is_invalid(photo_files: dict) -> None:
    with pytest.raises(InvalidImage, match="decode"):
        decode_image(photo_files[("coffee", "jpeg")][:5000], max_pixels=LIMIT)


def test_pixel_limit_is_checked_before_decoding() -> None:
    bomb = save(Image.new("L", (6000, 5000)), "PNG")  # ~30 kB that would decode to 30 MP
    with pytest.raises(PayloadTooLarge, match="6000x5000 = 30000000 pixels"):
        decode_image(bomb, max_pixels=1_000_000)
    assert decode_image(bomb, max_pixels=30_000_000).size == (6000, 5000)


def test_exif_orientation_is_applied(photos: dict) -> None:
    image = Image.fromarray(photos["coffee"])  # 600 x 400
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(save(image, "JPEG", exif=exif), max_pixels=LIMIT)
    assert decoded.size == (400, 600)
    top_left = np.asarray(decoded)[:40, :40].mean(axis=(0, 1))
    expected = photos["coffee"][-40:, :40].mean(axis=(0, 1))  # original bottom-left
    assert np.abs(top_left - expected).max() < 12


def test_transparency_is_composited_over_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgb = np.asarray(to_mode(rgba, "RGB"))
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[3, 3]) == (255, 255, 255)
    palette = rgba.convert("P")
    palette.info["transparency"] = palette.getpixel((3, 3))
    assert np.asarray(to_mode(palette, "L"))[3, 3] == 255
    la = Image.new("LA", (2, 2), (0, 0))
    assert np.asarray(to_mode(la, "L")).tolist() == [[255, 255], [255, 255]]


def test_sixteen_bit_images_are_rescaled() -> None:
    deep = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    decoded = decode_image(save(deep, "PNG"), max_pixels=LIMIT)
    assert np.asarray(to_mode(decoded, "L")).min() == 255
    assert np.asarray(to_mode(decoded, "RGB")).shape == (3, 3, 3)


def test_preprocess_matches_a_manual_pipeline(photos: dict) -> None:
    image = Image.fromarray(photos["coffee"])
    prepared = preprocess(image, RGB)
    # shorter side 400 -> floor(32 / 0.875) = 36, longer 600 -> 54; centre crop 32x32
    geometry = prepared.geometry
    assert (geometry.resized_width, geometry.resized_height) == (54, 36)
    assert (geometry.crop_left, geometry.crop_top) == (11, 2)
    resized = image.resize((54, 36), Image.Resampling.BICUBIC).crop((11, 2, 43, 34))
    manual = np.asarray(resized, dtype=np.float32) / 255.0
    manual = (manual - np.array(RGB.mean)) / np.array(RGB.std)
    assert prepared.tensor.shape == (3, 32, 32) and prepared.tensor.dtype == torch.float32
    np.testing.assert_allclose(prepared.tensor.permute(1, 2, 0).numpy(), manual, atol=1e-5)


def test_digits_become_one_channel(digits: list, photos: dict) -> None:
    _, data = digits[0]
    prepared = prepare(data, [DIGITS, RGB], max_pixels=LIMIT)
    assert [p.tensor.shape for p in prepared] == [(1, 64, 64), (3, 32, 32)]
    assert prepared[0].geometry.crop_left == 0 and prepared[0].geometry.width == 28
    assert prepared[0].tensor.min() >= -1.0 and prepared[0].tensor.max() <= 1.0
    gray = preprocess(Image.fromarray(photos["astronaut"]), DIGITS).tensor
    assert gray.shape == (1, 64, 64)


@pytest.mark.parametrize(("width", "height"), [(600, 400), (300, 451), (64, 64), (1, 500)])
def test_geometry_crop_fits_and_is_centred(width: int, height: int) -> None:
    for config in (DIGITS, RGB):
        geometry = plan_geometry(width, height, config)
        _, out_h, out_w = config.input_size
        assert min(geometry.resized_width - out_w, geometry.resized_height - out_h) >= 0
        assert abs(2 * geometry.crop_left + out_w - geometry.resized_width) <= 1
        assert abs(2 * geometry.crop_top + out_h - geometry.resized_height) <= 1
        short = min(geometry.resized_width, geometry.resized_height)
        assert short == int(out_h / config.crop_pct)
