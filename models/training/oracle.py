"""The digit-box oracle: how well can any classifier do when it is handed the digit's box?

It trains the zoo's `resnet_small` (the zoo recipe, the block `none`) on the 28x28 crop of each
training canvas's digit box, clutter inside the box included, and scores it on the box crops of
the held-out recipe, of every recipe of the grid and of the digits alone ("clean"). Localisation
is then free, so what it misses is what the clutter drawn over the digit and the 4,000 training
digits allow: an upper bound, in practice, for the zoo models that must also find the digit.

    python -m models.training.oracle [--epochs 24] [--val-per-class 50] [--widths 32 64 128]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from models.training.commands import ZOO_RECIPE
from models.training.data import (
    DIGIT_SIZE,
    GRID_RECIPES,
    HELDOUT_RECIPE,
    Canvases,
    ClutterRecipe,
    TrainingData,
    digits_training_data,
    scoring_canvases,
)
from models.training.train import accuracy, train_model


def box_crops(canvases: Canvases) -> np.ndarray:
    """(N, 1, 28, 28) uint8: each canvas cut to its digit box, resized to 28x28 (bilinear)."""
    crops = np.empty((len(canvases), 1, DIGIT_SIZE, DIGIT_SIZE), dtype=np.uint8)
    for row, (x0, y0, x1, y1) in enumerate(canvases.boxes):
        crop = canvases.images[row, y0:y1, x0:x1]
        if crop.shape != (DIGIT_SIZE, DIGIT_SIZE):
            crop = np.asarray(
                Image.fromarray(crop).resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BILINEAR)
            )
        crops[row, 0] = crop
    return crops


def oracle_data(seed: int, val_per_class: int = 0, limit: int | None = None) -> TrainingData:
    """The zoo's training data (varied recipe per canvas), each canvas cut to its digit box."""
    canvases = digits_training_data(seed, val_per_class, limit)

    def epoch(index: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = canvases.epoch(index)
        drawn = Canvases(images[:, 0], labels, canvases.boxes(index))
        return box_crops(drawn), labels

    return replace(
        canvases, input_size=(1, DIGIT_SIZE, DIGIT_SIZE), epoch=epoch, validation=None, boxes=None
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.training.oracle", description=__doc__)
    parser.add_argument("--epochs", type=int, default=ZOO_RECIPE.epochs)
    parser.add_argument(
        "--val-per-class",
        type=int,
        default=0,
        help="train on the training digits less this carve and score on the carve",
    )
    parser.add_argument("--widths", type=int, nargs=3, help="stage widths (the zoo's: 32 64 128)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kwargs = {**ZOO_RECIPE.model_kwargs, **({"widths": args.widths} if args.widths else {})}
    config = replace(ZOO_RECIPE, attention="none", epochs=args.epochs, model_kwargs=kwargs)
    result = train_model(config, oracle_data(config.seed, args.val_per_class), progress=False)
    scores = {}
    clean = ClutterRecipe(pieces=0)
    for recipe in (clean, HELDOUT_RECIPE, *GRID_RECIPES):
        canvases = scoring_canvases(recipe, args.val_per_class)
        name = "clean" if recipe == clean else recipe.name
        scores[name] = round(accuracy(result.model, box_crops(canvases), canvases.labels), 4)
    wall = round(result.wall_time_s)
    print(json.dumps({**kwargs, "epochs": args.epochs, "wall_time_s": wall, **scores}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
