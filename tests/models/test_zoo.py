"""The shipped digits-<block> packages: they load, match their cards and keep their scores."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from models import ATTENTION_BLOCKS, load_package
from models.training.commands import ZOO_DIR
from models.training.data import DIGIT_LABELS, box_fraction, heldout_canvases
from models.training.evaluate import evaluate_model

SUBSET = 300
MIN_ACCURACY = 0.95


@pytest.fixture(scope="module")
def canvases():
    return heldout_canvases().subset(SUBSET)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _package(block: str) -> Path:
    path = ZOO_DIR / f"digits-{block}"
    if not (path / "card.json").is_file():
        pytest.fail(f"{path} is missing; rebuild the zoo with `attnserve zoo`")
    return path


@pytest.mark.parametrize("block", ATTENTION_BLOCKS)
def test_package_matches_its_card(block: str) -> None:
    path = _package(block)
    model, card = load_package(path)
    weights = (path / "model.safetensors").read_bytes()
    assert card.weights_sha256 == hashlib.sha256(weights).hexdigest()
    assert len(weights) < 2_000_000
    assert (card.name, card.arch, card.attention) == (f"digits-{block}", "resnet_small", block)
    assert (model.arch, model.attention) == ("resnet_small", block)
    assert card.data_config.labels == DIGIT_LABELS
    assert card.data_config.input_size == (1, 64, 64)
    assert 0.0 < card.data_config.mean[0] < 0.2 and 0.1 < card.data_config.std[0] < 0.5
    training = card.training
    assert training["data"] == "digits" and training["seed"] == 0
    for key in ("epochs", "batch_size", "optimizer", "wall_time_s", "torch", "split"):
        assert key in training
    assert card.metrics["samples"] == 1000
    assert card.metrics["accuracy"] >= MIN_ACCURACY


@pytest.mark.parametrize("block", ATTENTION_BLOCKS)
def test_package_keeps_its_recorded_scores(block: str, canvases) -> None:
    model, card = load_package(_package(block))
    recorded = card.metrics
    measured = evaluate_model(model, canvases)
    p = recorded["accuracy"]
    tolerance = 3 * math.sqrt(max(p * (1 - p), 0.01) / SUBSET)
    assert measured["accuracy"] >= p - tolerance
    if block == "none":
        assert measured["summary"] is None and recorded["summary"] is None
        assert measured["sites"] == {}
        return
    baseline = box_fraction()
    summary = measured["summary"]
    assert summary["pointing"] >= 1.5 * baseline
    assert summary["energy"] >= 1.5 * baseline
    assert set(measured["sites"]) == set(recorded["sites"])
    q = recorded["summary"]["pointing"]
    assert summary["pointing"] >= q - 3 * math.sqrt(max(q * (1 - q), 0.01) / SUBSET)
