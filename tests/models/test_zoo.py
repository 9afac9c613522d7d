"""The shipped digits-<block> packages: they load, match their cards and keep their scores.

Inference only, on the first 300 canvases of the fixed held-out set; recorded scores (measured
on all 1,000) are allowed three binomial standard errors.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from models import ATTENTION_BLOCKS, load_package
from models.training.commands import ZOO_DIR, ZOO_RECIPE
from models.training.data import DIGIT_LABELS, box_fraction, heldout_canvases
from models.training.evaluate import evaluate_model

SUBSET = 300
MIN_ACCURACY = 0.95
WIDE_MARGIN = 1.5
SUMMARY_POINTS = {"se", "cbam", "gc", "coordatt", "sk"}
"""Blocks whose summary map points into the digit box >= 1.5x as often as a uniform map does
(measured; ECA's derived map reaches only 1.7x on the full set, too close to claim on 300)."""
SUMMARY_ENERGY = {"gc", "coordatt"}
"""Blocks whose summary map puts >= 1.5x the uniform share of its mass in the box (measured: the
others' maps, CBAM's included, spread too much mass over the clutter; see the zoo table)."""
GENUINE_SITE = {"cbam": "layer1.0.attn", "gc": "layer2.0.attn"}
"""A genuine spatial map per block that beats the baseline on both scores."""


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
    """(recorded, measured) metrics per block."""
    result = {}
    for block in ATTENTION_BLOCKS:
        model, card = load_package(_package(block))
        result[block] = (card.metrics, evaluate_model(model, canvases))
    return result


def _package(block: str) -> Path:
    path = ZOO_DIR / f"digits-{block}"
    if not (path / "card.json").is_file():
        pytest.fail(f"{path} is missing; rebuild the zoo with `attnserve zoo`")
    return path


def _close(measured: float, recorded: float) -> bool:
    """Within three binomial standard errors of a subset of SUBSET samples."""
    return abs(measured - recorded) <= 3 * math.sqrt(max(recorded * (1 - recorded), 0.01) / SUBSET)


@pytest.mark.parametrize("block", ATTENTION_BLOCKS)
def test_package_matches_its_card(block: str) -> None:
    path = _package(block)
    model, card = load_package(path)
    weights = (path / "model.safetensors").read_bytes()
    assert card.weights_sha256 == hashlib.sha256(weights).hexdigest()
    assert len(weights) < 2_000_000
    assert (card.name, card.arch, card.attention) == (f"digits-{block}", "resnet_small", block)
    assert (model.arch, model.attention) == ("resnet_small", block)
    assert card.model_kwargs == ZOO_RECIPE.model_kwargs
    assert card.data_config.labels == DIGIT_LABELS
    assert card.data_config.input_size == (1, 64, 64)
    assert 0.0 < card.data_config.mean[0] < 0.2 and 0.1 < card.data_config.std[0] < 0.5
    training = card.training
    assert training["data"] == "digits" and training["seed"] == ZOO_RECIPE.seed
    assert training["epochs"] == ZOO_RECIPE.epochs and training["lr"] == ZOO_RECIPE.lr
    for key in ("batch_size", "optimizer", "split", "wall_time_s", "torch", "threads"):
        assert key in training
    assert card.metrics["samples"] == 1000 and card.metrics["accuracy"] >= MIN_ACCURACY


@pytest.mark.parametrize("block", ATTENTION_BLOCKS)
def test_package_reaches_its_recorded_accuracy(block: str, scores) -> None:
    recorded, measured = scores[block]
    assert measured["samples"] == SUBSET
    assert _close(measured["accuracy"], recorded["accuracy"])
    assert measured["accuracy"] >= MIN_ACCURACY - 0.03


@pytest.mark.parametrize("block", ATTENTION_BLOCKS)
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


@pytest.mark.parametrize("block", ATTENTION_BLOCKS)
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
