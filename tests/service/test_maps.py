"""Attention maps back onto the original image, top-k, rounding and PNG encoding."""

from __future__ import annotations

import base64
import dataclasses
import io
import math

import numpy as np
import orjson
import pytest
import torch
from PIL import Image

from models import create_model
from service.api.encode import _map_entry, image_answer, top_k
from service.api.schemas import PredictOptions as MapOptions
from service.forward import ImageResult
from service.imaging import Geometry, plan_geometry, preprocess
from service.maps import (
    MapPlan,
    MapRequest,
    batch_maps,
    default_map_size,
    map_grid,
    output_size,
    to_original,
)
from service.runner import ModelRunner

CPU = torch.device("cpu")


def square(size: int = 64) -> Geometry:
    return Geometry(size, size, size, size, 0, 0, size, size)


def test_output_size_keeps_the_aspect_ratio() -> None:
    assert output_size(600, 400, 64) == (43, 64)
    assert output_size(300, 451, 64) == (64, 43)
    assert output_size(64, 64, 32) == (32, 32)
    assert output_size(5000, 1, 64) == (1, 64)


def test_default_map_size_is_the_longest_side_within_8_to_64() -> None:
    def size(width: int, height: int) -> int:
        return default_map_size(Geometry(width, height, 32, 32, 0, 0, 32, 32))

    assert [size(600, 400), size(28, 28), size(30, 50), size(5, 3)] == [64, 28, 50, 8]


def test_identity_when_nothing_was_cropped() -> None:
    grid_map = torch.rand(64, 64, generator=torch.Generator().manual_seed(0))
    grid, mask = map_grid(square(), 64)
    assert mask.all()
    torch.testing.assert_close(to_original(grid_map, grid, mask), grid_map)


def test_crop_region_only_is_covered() -> None:
    """600x400 -> 96x64 -> crop x in [16, 80): the original's x in [100, 500)."""
    geometry = Geometry(600, 400, 96, 64, 16, 0, 64, 64)
    grid, mask = map_grid(geometry, 60)
    mapped = to_original(torch.ones(64, 64), grid, mask)
    assert mapped.shape == (40, 60)
    columns = mapped.sum(0)
    assert torch.all(columns[:10] == 0) and torch.all(columns[50:] == 0)
    torch.testing.assert_close(mapped[:, 10:50], torch.ones(40, 40))


def test_a_ramp_stays_a_ramp_after_mapping_back() -> None:
    """Map value = x on the crop grid, so the mapped value must follow the original x."""
    geometry = plan_geometry(600, 400, create_model("resnet_small").data_config)
    ramp = (torch.arange(64, dtype=torch.float32) + 0.5).repeat(64, 1)
    grid, mask = map_grid(geometry, 60)
    mapped = to_original(ramp, grid, mask)[0]
    xs = (torch.arange(60) + 0.5) * 10  # original pixel centres
    expected = xs * geometry.scale_x - geometry.crop_left  # position on the crop grid
    inside = mask[0]
    torch.testing.assert_close(
        mapped[inside], expected[inside].float().clamp(0.5, 63.5), atol=1e-4, rtol=0
    )


def test_top_k_is_sorted_rounded_and_clipped() -> None:
    probs = np.array([0.1, 0.5, 0.123456789, 0.276543211], dtype=np.float32)
    best = top_k(probs, ("a", "b", "c", "d"), 3)
    assert [p["label"] for p in best] == ["b", "d", "c"]
    assert best[2] == {"label": "c", "index": 2, "probability": 0.12346}
    assert len(top_k(probs, ("a", "b", "c", "d"), 50)) == 4


def _outputs(block: str, photos: dict) -> tuple:
    torch.manual_seed(0)
    model = create_model("resnet_small", block)
    prepared = preprocess(Image.fromarray(photos["chelsea"]), model.data_config)
    out = ModelRunner(block, model, device=CPU).forward(prepared.tensor[None], capture=True)
    return out, prepared.geometry, model.data_config.labels


def image_result(
    probs: torch.Tensor,
    records: list,
    summary: torch.Tensor | None,
    geometry: Geometry,
    labels: tuple[str, ...],
    options: MapOptions,
) -> dict:
    """One image's answer object from its outputs (batch dimension 1), as the route builds it."""
    (maps,) = batch_maps(records, summary, [MapPlan.for_image(geometry, options.map_request())])
    return image_answer(ImageResult(probs.numpy(), geometry, maps), labels, options)


def _as_sent(*args: object) -> dict:
    """`image_result(*args)` as the client reads it: encoded the way the route does, parsed."""
    result = image_result(*args)  # type: ignore[arg-type]
    return orjson.loads(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY))


def _decimals_ok(values: object) -> bool:
    """Whether the numbers, as the client reads them from the JSON, have at most 3 decimals."""
    text = orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)
    flat = np.ravel(np.asarray(orjson.loads(text), dtype=np.float64))
    return bool(np.all(np.abs(flat * 1000 - np.round(flat * 1000)) < 1e-6))


@pytest.mark.parametrize("block", ["coordatt", "sk", "eca", "none"])
def test_levels_with_real_records(photos: dict, block: str) -> None:
    out, geometry, labels = _outputs(block, photos)
    args = (out.probs[0], out.records, out.summary, geometry, labels)
    nothing = _as_sent(*args, MapOptions(maps="none"))
    assert nothing["attention"] is None and nothing["image"] == {"width": 451, "height": 300}
    summary = _as_sent(*args, MapOptions(maps="summary", map_size=40))["attention"]
    layers = _as_sent(*args, MapOptions(maps="layers", map_size=40))["attention"]["layers"]
    every = _as_sent(*args, MapOptions(maps="all", map_size=40))["attention"]["layers"]
    if block == "none":
        assert summary == {"summary": None} and layers == [] and every == []
        return
    assert summary["summary"]["shape"] == [27, 40] and _decimals_ok(summary["summary"]["data"])
    assert all(e["shape"] == [27, 40] and e["kind"] == "spatial" for e in layers)
    assert {e["derived"] for e in layers} == {True}
    spatial = {(e["layer"], e["kind"]) for e in layers}
    raw = [e for e in every if (e["layer"], e["kind"]) not in spatial]
    assert raw and all(_decimals_ok(e["data"]) for e in every)
    for entry in raw:
        assert np.asarray(entry["data"]).shape == tuple(entry["shape"])
    shapes: dict[str, list[int]] = {}
    for entry in raw:
        shapes.setdefault(entry["kind"], entry["shape"])  # first site
    expected = {
        "coordatt": {"coord_h": [32, 32], "coord_w": [32, 32]},
        "sk": {"branch": [2, 32]},
        "eca": {"channel": [32]},
    }[block]
    assert {kind: shapes[kind] for kind in expected} == expected


def test_png_entries_decode_to_the_map_size(photos: dict) -> None:
    out, geometry, labels = _outputs("coordatt", photos)
    options = MapOptions(maps="all", map_size=50, map_format="png")
    attention = image_result(out.probs[0], out.records, out.summary, geometry, labels, options)[
        "attention"
    ]
    picture = Image.open(io.BytesIO(base64.b64decode(attention["summary"]["png"])))
    assert picture.size == (50, 33) and picture.mode == "RGB"
    coord = next(e for e in attention["layers"] if e["kind"] == "coord_h")
    assert Image.open(io.BytesIO(base64.b64decode(coord["png"]))).size == (32, 32)
    assert all("png" in e and "data" not in e for e in attention["layers"])


def test_png_colours_follow_the_values() -> None:
    geometry = square(8)
    ramp = torch.linspace(0, 1, 8).repeat(8, 1)
    summary = ramp[None]
    result = image_result(
        torch.tensor([1.0]), [], summary, geometry, ("x",), MapOptions(map_size=8, map_format="png")
    )
    pixels = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(result["attention"]["summary"]["png"])))
    )
    brightness = pixels.astype(float).sum(axis=2)[0]
    assert np.all(np.diff(brightness) > 0) and math.isclose(pixels[0, -1, 2], 37, abs_tol=1)


def test_map_numbers_print_as_their_three_decimal_rounding() -> None:
    """Map numbers go out rounded to 3 decimals, never as -0, whatever their magnitude."""
    rng = np.random.default_rng(0)
    for low, high in ((-1.0, 1.0), (-16383.0, 16383.0), (1e5, 2e5)):
        values = rng.uniform(low, high, (64, 64)).astype(np.float32)
        values[0, :3] = [-0.0001, -0.0, 0.0004]
        text = orjson.dumps(
            _map_entry(values, png=False)["data"], option=orjson.OPT_SERIALIZE_NUMPY
        )
        parsed = np.asarray(orjson.loads(text), dtype=np.float64)
        assert parsed.shape == values.shape and b"-0.0," not in text
        assert np.all(np.abs(parsed - values.astype(np.float64)) <= 0.0005 + 1e-9 * high)
        assert np.all(np.abs(parsed * 1000 - np.round(parsed * 1000)) < 1e-6 * max(1.0, high))


def _batch_outputs(block: str, photos: dict) -> tuple:
    """One forward of three photos: the first and last get maps of the same shape (43 x 64),
    the middle one (a tall crop) another."""
    torch.manual_seed(0)
    model = create_model("resnet_small", block)
    arrays = [photos["chelsea"], photos["chelsea"][:, :200], photos["coffee"]]
    prepared = [preprocess(Image.fromarray(a), model.data_config) for a in arrays]
    batch = torch.stack([p.tensor for p in prepared])
    out = ModelRunner(block, model, device=CPU).forward(batch, capture=True)
    return out, [p.geometry for p in prepared]


def _one(out: object, i: int) -> tuple:
    records = [dataclasses.replace(r, tensor=r.tensor[i : i + 1]) for r in out.records]
    return records, out.summary[i : i + 1]


@pytest.mark.parametrize("block", ["gc", "coordatt"])
def test_batch_maps_equal_each_image_alone(photos: dict, block: str) -> None:
    """batch_maps groups images by map shape and level; every image's maps must be what it
    gets in a batch of its own, whatever the others asked for."""
    out, geometries = _batch_outputs(block, photos)
    options = [MapRequest("all"), MapRequest("summary", 30), MapRequest("all")]
    plans = [MapPlan.for_image(g, o) for g, o in zip(geometries, options, strict=True)]
    assert plans[0].mask.shape == plans[2].mask.shape != plans[1].mask.shape  # type: ignore[union-attr]
    together = batch_maps(out.records, out.summary, plans)
    for i, maps in enumerate(together):
        (alone,) = batch_maps(*_one(out, i), [plans[i]])
        assert maps is not None and alone is not None
        np.testing.assert_array_equal(maps.summary, alone.summary)
        for got, want in zip(maps.layers + maps.native, alone.layers + alone.native, strict=True):
            assert (got.layer, got.kind, got.on_image) == (want.layer, want.kind, want.on_image)
            np.testing.assert_array_equal(got.values, want.values)
        assert len(maps.layers) == len(alone.layers) and len(maps.native) == len(alone.native)
    assert together[1] is not None and together[1].layers == []
    assert batch_maps(out.records, out.summary, [None, None, None]) == [None, None, None]


def test_batch_maps_are_the_single_map_resampling(photos: dict) -> None:
    """The batch path gives each image what `to_original` gives it for that image alone."""
    out, geometries = _batch_outputs("gc", photos)
    plans = [MapPlan.for_image(g, MapRequest("layers")) for g in geometries]
    context = next(r for r in out.records if r.kind == "context")
    for i, maps in enumerate(batch_maps(out.records, out.summary, plans)):
        assert maps is not None
        grid, mask = map_grid(geometries[i], default_map_size(geometries[i]))
        want = to_original(out.summary[i], grid, mask).numpy()
        np.testing.assert_allclose(maps.summary, want, rtol=0, atol=1e-6)
        layer = next(m for m in maps.layers if m.layer == context.site)
        view = context.tensor[i, 0] * context.tensor[i, 0].numel()
        want = to_original(view, grid, mask).numpy()
        assert layer.on_image and layer.kind == "context" and layer.values.max() > 1.0
        np.testing.assert_allclose(layer.values, want, rtol=0, atol=1e-5)


def test_prepare_items_plans_each_configs_maps(photos: dict) -> None:
    """The pool job of a request: one item per model config, with the map plan for its
    geometry (or none, and so no capture, for maps=none)."""
    from service.pipeline import prepare_items
    from tests.conftest import encode

    data = encode(photos["chelsea"], "JPEG")
    configs = [create_model("resnet_small").data_config, create_model("resnet18").data_config]
    items = prepare_items(data, configs, MapRequest("all", 30), max_pixels=10**8)
    assert len(items) == 2
    for item, config in zip(items, configs, strict=True):
        assert item.tensor.shape == config.input_size and item.geometry is not None
        assert item.plan is not None and item.plan.level == "all"
        assert tuple(item.plan.mask.shape) == output_size(451, 300, 30) == (20, 30)  # type: ignore[union-attr]
    (item,) = prepare_items(data, configs[:1], MapRequest("none"), max_pixels=10**8)
    assert item.plan is None
