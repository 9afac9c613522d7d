"""Colour scales, the overlay renderer, and the /v1 `map_format=overlay` and `colormap` options.

The colour tables must be the published ones: checked at known points (the hex codes the
authors publish) and entry by entry against matplotlib's copy of the same tables.
"""

from __future__ import annotations

import base64
import io
import typing
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from inprocess import Served, serve
from PIL import Image

from service.api.schemas import PredictOptions
from service.overlay import (
    COLORMAPS,
    blend,
    colorize,
    fit_size,
    grid,
    legend_height,
    lut,
    overlay,
    tables,
    value_range,
)
from service.settings import Settings

module_loop = pytest.mark.asyncio(loop_scope="module")

# First, middle and last colours as published: viridis and inferno by van der Walt and Smith
# (matplotlib 1.5's tables, #440154 ... #FDE725 and #000004 ... #FCFFA4), berlin by Crameri
# (Scientific colour maps: #9EB0FF ... #FFADAD, near black in the middle).
KNOWN = {
    ("viridis", 0): (0.267004, 0.004874, 0.329415),
    ("viridis", 128): (0.127568, 0.566949, 0.550556),
    ("viridis", 255): (0.993248, 0.906157, 0.143936),
    ("inferno", 0): (0.001462, 0.000466, 0.013866),
    ("inferno", 128): (0.735683, 0.215906, 0.330245),
    ("inferno", 255): (0.988362, 0.998364, 0.644924),
    ("berlin", 0): (0.62108, 0.69018, 0.99951),
    ("berlin", 255): (0.99987, 0.68007, 0.67995),
}
HEX_ENDS = {
    "viridis": ("440154", "fde725"),
    "inferno": ("000004", "fca50a" and "fcffa4"),
    "berlin": ("9eb0ff", "ffadad"),
}


@pytest.mark.parametrize(("name", "index"), list(KNOWN))
def test_tables_hold_the_published_values(name: str, index: int) -> None:
    np.testing.assert_allclose(tables()[name][index], KNOWN[name, index], atol=5e-7)


@pytest.mark.parametrize("name", COLORMAPS)
def test_tables_are_256_entries_equal_to_matplotlibs_copy(name: str) -> None:
    from matplotlib import _cm_listed

    published = np.asarray(getattr(_cm_listed, f"_{name}_data"))
    assert tables()[name].shape == (256, 3)
    np.testing.assert_array_equal(tables()[name], published)
    first, last = HEX_ENDS[name]
    assert bytes(lut(name)[0]).hex() == first and bytes(lut(name)[255]).hex() == last


def test_berlin_is_dark_in_the_middle_and_light_at_both_ends() -> None:
    brightness = lut("berlin").astype(int).sum(-1)
    assert brightness[128] < 50 < 400 < min(brightness[0], brightness[255])


def test_the_api_offers_exactly_the_known_colour_scales() -> None:
    field = PredictOptions.model_fields["colormap"]
    assert typing.get_args(field.annotation) == COLORMAPS
    with pytest.raises(ValueError, match="viridis, inferno, berlin"):
        lut("jet")


def test_value_range_holds_the_map_and_centres_diverging_scales() -> None:
    assert value_range(np.array([[0.2, 0.9]])) == (0.0, 1.0)
    assert value_range(np.array([[0.0, 5.5]])) == (0.0, 5.5)  # a GC context mask
    assert value_range(np.array([[-2.0, 0.5]]), "viridis") == (-2.0, 1.0)
    assert value_range(np.array([[-2.0, 0.5]]), "berlin") == (-2.0, 2.0)
    assert value_range(np.array([[0.2, 0.9]]), "berlin") == (-1.0, 1.0)


def test_colorize_puts_the_range_ends_on_the_scale_ends() -> None:
    colours = colorize(np.array([-1.0, 0.0, 2.0, 4.0, 9.0]), "inferno", 0.0, 4.0)
    assert (colours[0] == lut("inferno")[0]).all() and (colours[1] == lut("inferno")[0]).all()
    assert (colours[2] == lut("inferno")[128]).all()  # 2/4 * 255 = 127.5 rounds to 128
    assert (colours[3] == lut("inferno")[255]).all() and (colours[4] == lut("inferno")[255]).all()


@pytest.fixture(scope="module")
def photo(photos: dict[str, np.ndarray]) -> Image.Image:
    return Image.fromarray(photos["chelsea"])  # 451 x 300


def test_blend_at_opacity_0_is_the_image_and_at_1_the_colour_scale(photo: Image.Image) -> None:
    values = np.random.default_rng(0).random((photo.height, photo.width))
    original = np.asarray(photo).astype(int)
    assert np.array_equal(np.asarray(blend(photo, values, opacity=0.0)), original)
    coloured = np.asarray(blend(photo, values, colormap="inferno", opacity=1.0)).astype(int)
    assert np.array_equal(coloured, colorize(values.astype(np.float32), "inferno", 0.0, 1.0))
    half = np.asarray(blend(photo, values, colormap="inferno", opacity=0.5)).astype(int)
    between = np.minimum(original, coloured) - 1 <= half
    assert (between & (half <= np.maximum(original, coloured) + 1)).all()
    with pytest.raises(ValueError, match="opacity"):
        blend(photo, values, opacity=1.5)


@pytest.mark.parametrize(
    ("size", "cap", "expected"),
    [
        ((451, 300), 512, (451, 300)),  # under the cap: the image's own size
        ((1000, 500), 512, (512, 256)),  # landscape, capped
        ((200, 1000), 512, (102, 512)),  # portrait, capped
        ((64, 64), 128, (64, 64)),
    ],
)
def test_overlay_follows_the_aspect_ratio_and_the_cap(
    size: tuple[int, int], cap: int, expected: tuple[int, int]
) -> None:
    image = Image.new("RGB", size, (200, 120, 40))
    values = np.linspace(0, 1, 12 * 8).reshape(8, 12)
    picture = overlay(image, values, max_side=cap)
    width, height = expected
    assert picture.size == (width, height + legend_height(width))
    assert overlay(image, values, max_side=cap, legend=False).size == expected
    assert fit_size(*size, cap) == expected


def test_overlay_legend_shows_the_colour_scale(photo: Image.Image) -> None:
    picture = np.asarray(overlay(photo, np.zeros((4, 6)), colormap="viridis"))
    strip = picture[photo.height :]
    colours = {tuple(c) for c in strip.reshape(-1, 3)}
    assert tuple(lut("viridis")[0]) in colours and tuple(lut("viridis")[255]) in colours


def test_overlay_without_a_map_is_the_image(photo: Image.Image) -> None:
    picture = overlay(photo, None, legend=False)
    assert np.array_equal(np.asarray(picture), np.asarray(photo))


def test_grid_lays_panels_in_rows_under_titles() -> None:
    panels = [Image.new("RGB", (100, 80), (i * 40, 0, 0)) for i in range(5)]
    picture = grid(panels, [f"block{i}: 7 (96%)" for i in range(5)], columns=4)
    assert picture.width == 4 * (100 + 6) + 6
    assert picture.height > 2 * 80  # two rows of panels and their titles
    first_column = np.asarray(picture)[:, :112].reshape(-1, 3)
    for colour in ((0, 0, 0), (160, 0, 0)):  # panels 0 and 4, one above the other
        assert (first_column == colour).all(-1).sum() == 100 * 80
    with pytest.raises(ValueError, match="one title per panel"):
        grid(panels, ["a"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(model_repository: Path) -> AsyncIterator[Served]:
    settings = Settings(model_repository=model_repository, overlay_max_side=256, cpu_threads=2)
    async with serve(settings) as running:
        yield running


def _png(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


@module_loop
async def test_map_format_overlay_draws_the_summary_over_the_image(
    served: Served, photo_files: dict[tuple[str, str], bytes]
) -> None:
    data = photo_files[("chelsea", "png")]  # 451 x 300, over the 256 cap
    url = "/v1/models/tiny-gc/predict?map_size=64"
    numbers = (await served.client.post(url, files={"image": data})).json()
    answer = await served.client.post(f"{url}&map_format=overlay", files={"image": data})
    assert answer.status_code == 200, answer.text
    summary = answer.json()["results"][0]["attention"]["summary"]
    drawn = _png(summary["overlay"])
    assert drawn.size == (256, 170 + legend_height(256))
    assert _png(summary["png"]).size == (64, 43)
    values = np.asarray(numbers["results"][0]["attention"]["summary"]["data"])
    expected = overlay(Image.open(io.BytesIO(data)), values, max_side=256)
    difference = np.abs(np.asarray(drawn, dtype=int) - np.asarray(expected, dtype=int))
    assert difference.mean() < 0.5  # the JSON map is rounded to 3 decimals


@module_loop
async def test_colormap_colours_png_maps_and_is_validated(
    served: Served, photo_files: dict[tuple[str, str], bytes]
) -> None:
    data = photo_files[("coffee", "jpeg")]
    url = "/v1/models/tiny-gc/predict?map_size=16"
    numbers = (await served.client.post(url, files={"image": data})).json()
    values = np.asarray(numbers["results"][0]["attention"]["summary"]["data"])
    for name in COLORMAPS:
        answer = await served.client.post(
            f"{url}&map_format=png&colormap={name}", files={"image": data}
        )
        entry = answer.json()["results"][0]["attention"]["summary"]
        low, high = value_range(values, name)
        assert entry["range"] == [low, high]
        pixels = np.asarray(_png(entry["png"]).convert("RGB")).astype(int)
        # The JSON numbers are rounded to 3 decimals: at most one step along the scale.
        assert np.abs(pixels - colorize(values, name, low, high)).max() <= 4
    bad = await served.client.post(f"{url}&colormap=jet", files={"image": data})
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_options"
