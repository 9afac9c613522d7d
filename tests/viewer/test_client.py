"""`service.client` against the real server process: predictions, numpy maps, PIL overlays,
compare, the asynchronous twin, and error answers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import EXAMPLES, ZOO_MODELS
from PIL import Image

from service.client import APIError, AsyncClient, Client
from service.overlay import legend_height

pytestmark = pytest.mark.slow

DIGIT = EXAMPLES / "digit-7.png"


def test_predict_gives_predictions_numpy_maps_and_an_overlay(
    zoo_server: str, digit_box: tuple[int, int, int, int]
) -> None:
    with Client(zoo_server) as client:
        (result,) = client.predict(DIGIT, model="digits-cbam", maps="layers", top_k=3)
        by_block = client.predict(Image.open(DIGIT), attention="cbam", top_k=3)[0]
    assert result.model == "digits-cbam" and result.size == (64, 64)
    assert result.predictions[0].label == "7"
    assert [p.label for p in by_block.predictions] == [p.label for p in result.predictions]
    assert result.summary is not None and result.summary.shape == (64, 64)
    assert result.summary.dtype == np.float32 and result.summary.max() == 1.0
    row, col = np.unravel_index(result.summary.argmax(), result.summary.shape)
    x0, y0, x1, y1 = digit_box
    assert x0 <= col < x1 and y0 <= row < y1  # where CBAM looks: on the digit
    assert [layer.kind for layer in result.layers] == ["spatial"] * len(result.layers)
    assert all(layer.values.shape == (64, 64) for layer in result.layers)
    picture = result.overlay(DIGIT, opacity=1.0, legend=False)
    assert picture.size == (64, 64)
    assert result.overlay(DIGIT).size == (64, 64 + legend_height(64))


def test_several_images_and_compare(zoo_server: str) -> None:
    with Client(zoo_server) as client:
        results = client.predict(
            [DIGIT, EXAMPLES / "digit-3.png"], model="digits-gc", maps="none", top_k=1
        )
        compared = client.compare(DIGIT.read_bytes(), top_k=1, map_size=16)
        assert {m["name"] for m in client.models()} == set(ZOO_MODELS)
    assert [r.predictions[0].label for r in results] == ["7", "3"]
    assert all(r.summary is None for r in results)
    assert sorted(r.model for r in compared) == sorted(ZOO_MODELS)
    for r in compared:
        expected = None if r.model == "digits-none" else (16, 16)
        assert (None if r.summary is None else r.summary.shape) == expected


async def test_async_client_matches_the_sync_one(zoo_server: str) -> None:
    with Client(zoo_server) as client:
        (sync,) = client.predict(DIGIT, model="digits-cbam")
    async with AsyncClient(zoo_server) as client:
        (result,) = await client.predict(DIGIT, model="digits-cbam")
        compared = await client.compare(DIGIT, models=["digits-none", "digits-cbam"])
    assert result.predictions == sync.predictions
    np.testing.assert_array_equal(result.summary, sync.summary)
    assert [r.model for r in compared] == ["digits-none", "digits-cbam"]


def test_error_answers_raise_api_error(zoo_server: str) -> None:
    with Client(zoo_server) as client:
        with pytest.raises(APIError) as bad_image:
            client.predict(b"not an image", model="digits-cbam")
        with pytest.raises(APIError) as bad_model:
            client.predict(DIGIT, model="nope")
        with pytest.raises(ValueError, match="exactly one of"):
            client.predict(DIGIT)
    assert (bad_image.value.status, bad_image.value.error) == (400, "invalid_image")
    assert bad_model.value.status == 404 and "digits-cbam" in str(bad_model.value.detail)
