"""Train on your own images: a folder with one subfolder per class (Pillow + torch only).

Images are decoded once, resized the way the service resizes them (shorter side to H/crop_pct,
centre crop H x W) and kept in memory as uint8, so epochs cost no decoding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.training.data import TrainingData

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def find_images(root: Path) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """(paths, label indices, class names) of `root/<class>/<image>`; classes sorted by name."""
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist. Hint: pass a directory path")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths.extend(files)
        labels.extend([index] * len(files))
    if len(classes) < 2 or not paths:
        raise ValueError(
            f"{root} needs at least two class subfolders holding images "
            f"({', '.join(IMAGE_SUFFIXES)}); found classes {list(classes)}"
        )
    return paths, np.asarray(labels, dtype=np.int64), classes


def load_image(path: Path, input_size: tuple[int, int, int], crop_pct: float = 1.0) -> np.ndarray:
    """Decode one image to uint8 (C, H, W): resize the shorter side to H/crop_pct, centre-crop."""
    channels, height, width = input_size
    with Image.open(path) as opened:
        image = opened.convert("L" if channels == 1 else "RGB")
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    tensor = tensor.reshape(tensor.shape[0], tensor.shape[1], -1).permute(2, 0, 1)[None]
    short = min(tensor.shape[-2:])
    scale = max(height, width) / crop_pct / short
    size = (
        max(height, round(tensor.shape[-2] * scale)),
        max(width, round(tensor.shape[-1] * scale)),
    )
    resized = torch.nn.functional.interpolate(
        tensor, size=size, mode="bilinear", align_corners=False, antialias=True
    )[0]
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    cropped = resized[:, top : top + height, left : left + width]
    return cropped.round().clamp(0, 255).to(torch.uint8).numpy()


def load_folder(
    root: Path, input_size: tuple[int, int, int], crop_pct: float = 1.0
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Every image of `root` as uint8 (N, C, H, W), with label indices and class names."""
    paths, labels, classes = find_images(root)
    return np.stack([load_image(p, input_size, crop_pct) for p in paths]), labels, classes


def imagefolder_training_data(
    root: Path, input_size: tuple[int, int, int], seed: int, val_fraction: float = 0.1
) -> TrainingData:
    """Training data from an image folder; a seeded `val_fraction` of each class is held out."""
    images, labels, classes = load_folder(root, input_size)
    rng = np.random.default_rng(seed)
    val_mask = np.zeros(len(labels), dtype=bool)
    for c in range(len(classes)):
        members = rng.permutation(np.flatnonzero(labels == c))
        val_mask[members[: int(len(members) * val_fraction)]] = True
    fit_images, fit_labels = images[~val_mask], labels[~val_mask]
    validation = (images[val_mask], labels[val_mask]) if val_mask.any() else None
    logger.info("image folder %s: %d images, %d classes", root, len(labels), len(classes))

    def epoch(index: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([seed, index]).permutation(len(fit_labels))
        return fit_images[order], fit_labels[order]

    provenance = {
        "data": "imagefolder",
        "source": str(root),
        "split": f"seeded {val_fraction:.0%} of each class held out for validation (seed {seed})",
        "train_images": len(fit_labels),
        "validation_images": int(val_mask.sum()),
    }
    return TrainingData(
        name="imagefolder",
        labels=classes,
        input_size=input_size,
        epoch=epoch,
        validation=validation,
        provenance=provenance,
    )
