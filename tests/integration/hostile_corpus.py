"""Hostile and unusual image files, built at test time with Pillow and numpy (no binary fixtures).

Broken files: truncated and corrupted data, headers that lie about the size, decompression bombs
(huge dimensions in a tiny file). Valid but unusual files: 1x1, a 4000x3 strip, 16-bit, palette
with transparency, grayscale+alpha, CMYK, EXIF-rotated, animated GIF, progressive JPEG.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib

import numpy as np
from PIL import Image


def picture(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A deterministic RGB uint8 picture: gradients plus noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256])
    noise = rng.integers(0, 40, size=(3, height, width))
    return np.clip(base + noise, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def encoded(fmt: str, **params: object) -> bytes:
    """The standard picture as a file of format `fmt` (PNG, JPEG, GIF, WEBP, BMP, TIFF)."""
    return save(Image.fromarray(picture()), fmt, **params)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first `keep` share of the file."""
    return data[: max(1, int(len(data) * keep))]


def corrupted(data: bytes, start: float = 0.4, length: int = 64, seed: int = 1) -> bytes:
    """`length` random bytes written over the file from `start` (a share of its length) on."""
    rng = np.random.default_rng(seed)
    offset = int(len(data) * start)
    noise = rng.integers(0, 256, size=length, dtype=np.uint8).tobytes()
    return data[:offset] + noise + data[offset + length :]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_claiming(width: int, height: int, rows: int = 2) -> bytes:
    """A grayscale PNG whose header says `width` x `height` while its data holds `rows` rows of
    an 8-pixel-wide image: a lying header, and past the pixel limit a decompression bomb that
    costs nothing to send."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"".join(b"\x00" + bytes(range(8)) for _ in range(rows)))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def png_bomb(side: int) -> bytes:
    """A real, complete PNG of `side` x `side` black pixels: a few KB, side^2 pixels decoded."""
    return save(Image.new("1", (side, side)), "PNG", optimize=True)


def bmp_claiming(width: int, height: int) -> bytes:
    """The standard picture as BMP with the info header's width and height rewritten."""
    data = bytearray(encoded("BMP"))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    """The standard picture as GIF with the screen and the frame's size rewritten."""
    data = bytearray(encoded("GIF"))
    struct.pack_into("<HH", data, 6, width, height)
    frame = data.index(b"\x2c", 13 + 3 * 256 if data[10] & 0x80 else 13)
    struct.pack_into("<HH", data, frame + 5, width, height)
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """The standard picture as baseline JPEG with its frame header's (SOF0) size rewritten."""
    data = bytearray(encoded("JPEG", quality=85))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gzip_bomb(size: int) -> bytes:
    """`size` zero bytes, gzip-compressed (about 1000:1)."""
    return gzip.compress(bytes(size), compresslevel=9)


def deflate_bomb(size: int) -> bytes:
    """`size` zero bytes in a zlib (HTTP "deflate") stream."""
    return zlib.compress(bytes(size), 9)


# Valid but unusual files: each must be answered 200.


def one_pixel() -> bytes:
    return save(Image.new("RGB", (1, 1), (200, 30, 90)), "PNG")


def wide_strip() -> bytes:
    """4000 x 3 pixels."""
    return save(Image.fromarray(picture(3, 4000)), "PNG")


def sixteen_bit_png() -> bytes:
    y, x = np.mgrid[0:40, 0:56]
    return save(Image.fromarray((x * 1000 + y * 300).astype(np.uint16)), "PNG")


def palette_png_with_transparency() -> bytes:
    image = Image.fromarray(picture()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return save(image, "PNG", transparency=0)


def gray_alpha_png() -> bytes:
    gray = Image.fromarray(picture()).convert("L")
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1)))
    return save(Image.merge("LA", (gray, alpha)), "PNG")


def cmyk_jpeg() -> bytes:
    return save(Image.fromarray(picture()).convert("CMYK"), "JPEG", quality=90)


def exif_rotated_jpeg() -> bytes:
    """Stored 64 wide x 48 high with EXIF orientation 6 (rotate 90 degrees): 48 x 64 upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(Image.fromarray(picture()), "JPEG", quality=90, exif=exif)


def animated_gif() -> bytes:
    """Four frames that differ: the picture, its negative, and both flipped upside down."""
    first = picture()
    frames = [first, 255 - first, first[::-1], (255 - first)[::-1]]
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    return save(images[0], "GIF", save_all=True, append_images=images[1:], duration=50, loop=0)


def gif_frame(data: bytes, index: int) -> bytes:
    """Frame `index` of a GIF, decoded to RGB and saved as PNG (the pixels a reader sees)."""
    image = Image.open(io.BytesIO(data))
    image.seek(index)
    return save(image.convert("RGB"), "PNG")


def progressive_jpeg() -> bytes:
    return save(Image.fromarray(picture()), "JPEG", quality=90, progressive=True)
