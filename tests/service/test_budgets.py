"""Per-request budgets and strict options: refused before any work, with the figures in the
413 detail; /v1/compare counts each model once."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from inprocess import Served, serve

from service.budget import PREDICTION_BYTES, MapCounts, ResultCost, check_budget, result_cost
from service.errors import PayloadTooLarge
from service.maps import MapRequest
from service.settings import Settings

module_loop = pytest.mark.asyncio(loop_scope="module")

MODELS = ["tiny-cbam", "tiny-gc", "tiny-se"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(model_repository: Path) -> AsyncIterator[Served]:
    settings = Settings(
        model_repository=model_repository,
        max_batch_size=4,
        cpu_threads=2,
        max_response_bytes=2_000_000,
        max_map_cells=400_000,
    )
    async with serve(settings) as running:
        yield running


def _forwards(served: Served, model: str) -> int:
    """Images the model's batcher has run (from the Prometheus histogram's sum)."""
    text = served.services.metrics.render().decode()
    for line in text.splitlines():
        if line.startswith("attnserve_batch_size_sum") and f'model="{model}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def test_result_cost_follows_the_formula() -> None:
    counts = MapCounts(views=3, native=1000)
    summary = result_cost(counts, MapRequest("summary", 10), head_bytes=50)
    assert summary.cells == 100 and summary.answer_bytes == 512 + 50 + 100 * 8
    layers = result_cost(counts, MapRequest("layers", 10), head_bytes=0, image_format="png")
    assert layers.cells == 400 and layers.answer_bytes == 512 + 400 * 4
    full = result_cost(counts, MapRequest("all"), head_bytes=0)
    assert full.cells == 4 * 64 * 64 + 1000
    assert result_cost(counts, MapRequest("none"), head_bytes=0).cells == 0
    overlay = result_cost(
        counts, MapRequest("summary", 10), head_bytes=0, image_format="overlay", overlay_side=256
    )
    assert overlay.answer_bytes == 512 + 100 * 4 + 4 * 256 * 256
    check_budget([ResultCost(10, 10)], 3, max_cells=30, max_answer_bytes=30)  # at the limit
    with pytest.raises(PayloadTooLarge, match="31 map cells"):
        check_budget([ResultCost(31, 1)], 1, max_cells=30, max_answer_bytes=10**9)
    with pytest.raises(PayloadTooLarge, match="up to 40 bytes"):
        check_budget([ResultCost(1, 20)], 2, max_cells=30, max_answer_bytes=39)


@module_loop
async def test_budgets_refuse_before_any_work(served: Served, digits: list) -> None:
    png = digits[0][1]
    url = "/v1/models/tiny-cbam/predict"
    before = _forwards(served, "tiny-cbam")
    files = [("file", (f"{i}.png", png, "image/png")) for i in range(8)]
    # 8 images x (1 + views) x 256^2 cells is far past the 400,000-cell budget.
    refused = await served.client.post(url, params={"maps": "layers", "map_size": 256}, files=files)
    assert refused.status_code == 413, refused.text
    body = refused.json()
    assert body["error"] == "payload_too_large" and "map cells" in body["detail"]
    assert "400000" in body["detail"]
    # Within the cell budget but past the 2 MB answer budget: 8 x (1 + views) x 96^2 numbers.
    heavy = await served.client.post(url, params={"maps": "layers", "map_size": 96}, files=files)
    assert heavy.status_code == 413 and "response budget" in heavy.json()["detail"], heavy.text
    assert _forwards(served, "tiny-cbam") == before  # nothing reached the model
    fine = await served.client.post(url, params={"maps": "summary"}, files=files)
    assert fine.status_code == 200 and len(fine.content) < 2_000_000
    assert _forwards(served, "tiny-cbam") == before + 8
    counts = served.services.registry.get("tiny-cbam").map_counts
    for level in ("summary", "layers", "all"):  # the estimate bounds the real answer
        one = await served.client.post(url, params={"maps": level, "map_size": 40}, files=files[:1])
        bound = result_cost(counts, MapRequest(level, 40), head_bytes=5 * PREDICTION_BYTES)
        assert one.status_code == 200 and len(one.content) <= bound.answer_bytes, level


@module_loop
async def test_v2_infer_is_budgeted(served: Served, digits: list) -> None:
    """Asking /v2 for an attention output runs the batch at maps=all: 32 images of it are past
    the 400,000-cell budget, 4 are within it."""
    hosted = served.services.registry.get("tiny-cbam")
    from service.api.v2_outputs import site_outputs

    cost = result_cost(hosted.map_counts, MapRequest("all", 64), head_bytes=0)
    assert 32 * cost.cells > 400_000 >= 4 * cost.cells
    site = next(iter(site_outputs(hosted)))
    encoded = base64.b64encode(digits[0][1]).decode()

    def request(count: int) -> dict:
        image = {"name": "image", "datatype": "BYTES", "shape": [count], "data": [encoded] * count}
        return {"inputs": [image], "outputs": [{"name": site}]}

    refused = await served.infer("tiny-cbam", request(32))
    assert refused.status_code == 413 and "map cells" in refused.json()["error"], refused.text
    answered = await served.infer("tiny-cbam", request(4))
    assert answered.status_code == 200, answered.text


@module_loop
async def test_compare_counts_each_model_once(served: Served, digits: list) -> None:
    png = digits[1][1]
    before = {m: _forwards(served, m) for m in MODELS}
    listed = ",".join(["tiny-cbam"] * 250 + ["tiny-se", " tiny-cbam", "tiny-se"])
    answer = await served.client.post(
        "/v1/compare", params={"models": listed}, content=png, headers={"content-type": "image/png"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["models"] == ["tiny-cbam", "tiny-se"]
    assert [r["model"] for r in answer.json()["results"]] == ["tiny-cbam", "tiny-se"]
    after = {m: _forwards(served, m) for m in MODELS}
    assert after == {"tiny-cbam": before["tiny-cbam"] + 1, "tiny-gc": before["tiny-gc"],
                     "tiny-se": before["tiny-se"] + 1}  # fmt: skip


@module_loop
@pytest.mark.parametrize(
    "body",
    [
        {"top_k": True},
        {"top_k": False},
        {"map_size": True},
        {"maps": 1},
        {"map_format": 0},
        {"unknown_option": 1},
        {"top_k": "3", "extra": None},
    ],
)
async def test_json_options_are_strict(served: Served, digits: list, body: dict) -> None:
    payload = {"images": [base64.b64encode(digits[2][1]).decode()], **body}
    answer = await served.client.post("/v1/models/tiny-se/predict", json=payload)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "invalid_options"
