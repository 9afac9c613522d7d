"""The shipped digits-<block> packages: they load, match their cards and keep their scores.

Inference only, on the first 300 canvases of the fixed held-out set and of one unseen clutter
recipe of the evaluation grid; recorded scores (measured on all 1,000) are allowed three
binomial standard errors (for the region IoU, a value in [0, 1], that bound holds too).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from models import load_package
from models.training.commands import (
    ZOO_BLOCKS,
    ZOO_DIR,
    ZOO_RECIPE,
    zoo_epochs,
    zoo_model_kwargs,
)
from models.training.data import DIGIT_LABELS, ClutterRecipe, box_fraction, heldout_canvases
from models.training.evaluate import evaluate_grid, evaluate_model

SUBSET = 300
UNSEEN = ClutterRecipe(12, 12)
"""The grid's most cluttered recipe: 12 pieces of 12x12."""
MIN_ACCURACY = 0.94
"""Held-out accuracy of every package (recorded 0.946-0.974; docs/models.md)."""
MIN_UNSEEN_ACCURACY = 0.68
"""Recorded accuracy on the most cluttered grid recipe (0.700-0.823): the clutter-varied
training holds there, where the single-recipe zoo fell to 0.575-0.737. digits-stn is the
lowest (0.700): its localising transformer sometimes crops a clutter piece there."""
MIN_REGION_IOU = 0.5
"""digits-stn's region against the digit box on the held-out recipe (recorded 0.62; the
issue's target)."""
WIDE_MARGIN = 1.5
SUMMARY_POINTS = {"se", "cbam", "gc", "coordatt", "sk", "stn"}
"""Blocks whose summary map points into the digit box >= 1.5x as often as a uniform map does
(measured; ECA's derived map reaches only 1.8x on the full set, too close to claim on 300)."""
SUMMARY_ENERGY = {"gc", "coordatt", "stn"}
"""Blocks whose summary map puts >= 1.5x the uniform share of its mass in the box (measured: the
others' maps, CBAM's included, spread too much mass over the clutter; see the zoo table)."""
GENUINE_SITE = {"gc": "layer2.0.attn"}
"""A genuine spatial map per block that beats the baseline on both scores (CBAM's first gate
points at the digit, 0.98, but spreads its mass: energy 0.24)."""


@pytest.fixture(scope="module")
def canvases():
    return heldout_canvases().subset(SUBSET)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def scores(canvases) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """(recorded, measured) metrics per block: held-out recipe, and the unseen one under
    "unseen"."""
    result = {}
    for block in ZOO_BLOCKS:
        model, card = load_package(_package(block))
        measured = evaluate_model(model, canvases)
        measured["unseen"] = evaluate_grid(model, (UNSEEN,), SUBSET)[UNSEEN.name]
        result[block] = (card.metrics, measured)
    return result


def _package(block: str) -> Path:
    path = ZOO_DIR / f"digits-{block}"
    if not (path / "card.json").is_file():
        pytest.fail(f"{path} is missing; rebuild the zoo with `attnserve zoo`")
    return path


def _close(measured: float, recorded: float) -> bool:
    """Within three binomial standard errors of a subset of SUBSET samples."""
    return abs(measured - recorded) <= 3 * math.sqrt(max(recorded * (1 - recorded), 0.01) / SUBSET)


@pytest.mark.parametrize("block", ZOO_BLOCKS)
def test_package_matches_its_card(block: str) -> None:
    path = _package(block)
    model, card = load_package(path)
    weights = (path / "model.safetensors").read_bytes()
    assert card.weights_sha256 == hashlib.sha256(weights).hexdigest()
    assert len(weights) < 2_000_000
    assert (card.name, card.arch, card.attention) == (f"digits-{block}", "resnet_small", block)
    assert (model.arch, model.attention) == ("resnet_small", block)
    assert card.model_kwargs == zoo_model_kwargs(block)
    assert card.data_config.labels == DIGIT_LABELS
    assert card.data_config.input_size == (1, 64, 64)
    assert 0.0 < card.data_config.mean[0] < 0.2 and 0.1 < card.data_config.std[0] < 0.5
    training = card.training
    assert training["data"] == "digits" and training["seed"] == ZOO_RECIPE.seed
    assert training["epochs"] == zoo_epochs(block) and training["lr"] == ZOO_RECIPE.lr
    for key in ("batch_size", "optimizer", "split", "wall_time_s", "torch", "threads"):
        assert key in training
    assert card.metrics["samples"] == 1000 and card.metrics["accuracy"] >= MIN_ACCURACY
    assert card.metrics["grid"][UNSEEN.name]["accuracy"] >= MIN_UNSEEN_ACCURACY


@pytest.mark.parametrize("block", ZOO_BLOCKS)
def test_package_reaches_its_recorded_accuracy(block: str, scores) -> None:
    recorded, measured = scores[block]
    assert measured["samples"] == SUBSET
    assert _close(measured["accuracy"], recorded["accuracy"])
    assert measured["accuracy"] >= MIN_ACCURACY - 0.03


@pytest.mark.parametrize("block", ZOO_BLOCKS)
def test_localization_reproduces_the_card(block: str, scores) -> None:
    recorded, measured = scores[block]
    if block == "none":
        assert measured["summary"] is None and recorded["summary"] is None
        assert measured["sites"] == {} == recorded["sites"]
        return
    assert set(measured["sites"]) == set(recorded["sites"])
    pairs = [(measured["summary"], recorded["summary"])]
    pairs += [(measured["sites"][s], recorded["sites"][s]) for s in recorded["sites"]]
    for now, then in pairs:
        assert _close(now["pointing"], then["pointing"]), (now, then)
        assert _close(now["energy"], then["energy"]), (now, then)
    assert ("region_iou" in measured) == ("region_iou" in recorded) == (block == "stn")
    if block == "stn":
        assert _close(measured["region_iou"], recorded["region_iou"])


@pytest.mark.parametrize("block", ZOO_BLOCKS)
def test_unseen_recipe_reproduces_the_card(block: str, scores) -> None:
    recorded, measured = scores[block]
    then, now = recorded["grid"][UNSEEN.name], measured["unseen"]
    assert now["samples"] == SUBSET
    keys = {"accuracy", "pointing", "energy", "region_iou"} & set(then)
    assert keys == {"accuracy", "pointing", "energy", "region_iou"} & set(now)
    for key in keys:
        assert _close(now[key], then[key]), (key, now, then)


@pytest.mark.parametrize("block", ZOO_BLOCKS)
def test_attention_maps_find_the_digit(block: str, scores) -> None:
    _, measured = scores[block]
    wide = WIDE_MARGIN * box_fraction()
    summary = measured["summary"]
    if block in SUMMARY_POINTS:
        assert summary["pointing"] >= wide
    if block in SUMMARY_ENERGY:
        assert summary["energy"] >= wide
    if block in GENUINE_SITE:
        site = measured["sites"][GENUINE_SITE[block]]
        assert not site["derived"]
        assert site["pointing"] >= wide and site["energy"] >= wide
    if block != "none":
        assert summary["pointing"] > box_fraction()
    if block == "stn":  # the sampled region finds the digit (the whole canvas: IoU 784 / 4096)
        assert measured["region_iou"] >= MIN_REGION_IOU
        assert measured["unseen"]["region_iou"] >= 2 * box_fraction()
