"""A spatial transformer's answer: its region on the original image, its density as the summary,
its crop as an image, over /v1 and /v2, served from the shipped digits-stn package."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from models import load_package
from models.training.commands import ZOO_DIR
from models.training.data import heldout_canvases
from service.imaging import plan_geometry
from service.maps import points_to_original
from service.settings import Settings
from tests.service.inprocess import Served, serve

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digit-7.png"
PAD = 16  # blank columns each side of the example, so the service resizes and crops
SCALE = 1.5
module_loop = pytest.mark.asyncio(loop_scope="module")


def test_points_go_back_through_resize_and_crop() -> None:
    from models import create_model

    config = create_model("resnet_small").data_config
    geometry = plan_geometry(160, 96, config)  # 96 rows -> 64: scale 2/3, 106 wide, crop 21
    assert (geometry.crop_left, geometry.crop_top) == (21, 0)
    inside = np.array([[0.0, 0.0], [64.0, 64.0], [10.5, 20.25]], dtype=np.float32)
    original = points_to_original(inside, geometry)
    # forward again as map_grid does: x * scale - crop
    back = original * np.array([geometry.scale_x, geometry.scale_y]) - np.array([21, 0])
    np.testing.assert_allclose(back, inside, atol=1e-4)
    np.testing.assert_allclose(original[1], [(64 + 21) * 160 / 106, 96], rtol=1e-6)


def _example_and_box() -> tuple[bytes, tuple[float, float, float, float]]:
    """The example canvas enlarged 1.5x and padded left and right, and its digit's box there."""
    canvas = np.asarray(Image.open(EXAMPLE))
    held = heldout_canvases()
    index = next(i for i, image in enumerate(held.images) if np.array_equal(image, canvas))
    x0, y0, x1, y1 = (float(v) for v in held.boxes[index])
    side = round(64 * SCALE)
    big = np.asarray(Image.fromarray(canvas).resize((side, side), Image.Resampling.BILINEAR))
    padded = np.pad(big, ((0, 0), (PAD, PAD)))
    buffer = io.BytesIO()
    Image.fromarray(padded).save(buffer, format="PNG")
    box = (x0 * SCALE + PAD, y0 * SCALE, x1 * SCALE + PAD, y1 * SCALE)
    return buffer.getvalue(), box


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served() -> AsyncIterator[Served]:
    settings = Settings(model_repository=ZOO_DIR, models=["digits-stn"], cpu_threads=1)
    async with serve(settings) as running:
        yield running


def _iou(region: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """IoU of the region's axis-aligned extent with the box (the zoo's transform is scale and
    translation, so the region is that rectangle)."""
    (rx0, ry0), (rx1, ry1) = region.min(0), region.max(0)
    x0, y0, x1, y1 = box
    inter = max(0.0, min(rx1, x1) - max(rx0, x0)) * max(0.0, min(ry1, y1) - max(ry0, y0))
    union = (rx1 - rx0) * (ry1 - ry0) + (x1 - x0) * (y1 - y0) - inter
    return inter / union


def _check_covers(region: np.ndarray, box: tuple[float, float, float, float]) -> None:
    """The digit's centre lies in the region, and the region overlaps the digit's box with an
    IoU of at least 0.5 (digits-stn is trained towards the box's central 85 %: IoU 0.72)."""
    (rx0, ry0), (rx1, ry1) = region.min(0), region.max(0)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert rx0 < cx < rx1 and ry0 < cy < ry1, (region, box)
    assert _iou(region, box) >= 0.5, (region, box)


@module_loop
async def test_the_region_on_the_original_image_covers_the_digit(served: Served) -> None:
    image, box = _example_and_box()
    response = await served.client.post(
        "/v1/models/digits-stn/predict?maps=all&map_format=png",
        content=image,
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["predictions"][0]["label"] == "7"
    assert result["image"] == {"width": 64 * 1.5 + 2 * PAD, "height": 96}
    layers = {(layer["layer"], layer["kind"]): layer for layer in result["attention"]["layers"]}
    region = np.array(layers[("stn", "region")]["data"])
    assert region.shape == (4, 2)
    _check_covers(region, box)
    # the region is on the photo (the box above is in its pixels), inside its bounds
    assert (region >= 0).all() and (region[:, 0] <= 64 * SCALE + 2 * PAD).all()
    assert (region[:, 1] <= 96).all()
    # the crop is an image: a grey PNG of the transformer's output size
    crop = layers[("stn", "crop")]
    picture = Image.open(io.BytesIO(base64.b64decode(crop["png"])))
    assert picture.mode == "L" and picture.size == (32, 32) and crop["shape"] == [1, 32, 32]
    # the summary is the sampling density mapped onto the photo
    summary = result["attention"]["summary"]
    assert summary["shape"] == [48, 64]  # the default map size: longest side 64


@module_loop
async def test_v2_names_the_region_outputs(served: Served) -> None:
    image, box = _example_and_box()
    meta = (await served.client.get("/v2/models/digits-stn")).json()
    names = {output["name"] for output in meta["outputs"]}
    assert {"attention/stn/region", "attention/stn/region_original"} <= names
    assert {"attention/stn/theta", "attention/stn/crop", "attention/stn/spatial"} <= names
    request = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(image).decode()],
            }
        ],
        "outputs": [
            {"name": "attention/stn/region"},
            {"name": "attention/stn/region_original"},
            {"name": "attention_summary"},
        ],
    }
    response = await served.infer("digits-stn", request)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    native = np.array(outputs["attention/stn/region"]["data"]).reshape(4, 2)
    original = np.array(outputs["attention/stn/region_original"]["data"]).reshape(4, 2)
    assert outputs["attention/stn/region_original"]["shape"] == [1, 4, 2]
    geometry = plan_geometry(128, 96, load_package(ZOO_DIR / "digits-stn")[1].data_config)
    np.testing.assert_allclose(original, points_to_original(native, geometry), atol=2e-3)
    _check_covers(original, box)
