"""The HTTP API in-process: every route, every input form, map levels and formats, every error.

Apps run their real lifespan (background loading, warm-up, batchers, device worker) over a
temporary repository of real model packages; requests go through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from inprocess import Served, serve, wait_loaded
from PIL import Image
from pydantic import ValidationError

from service.app import ConfigError, create_app
from service.settings import Settings
from service.state import Services

module_loop = pytest.mark.asyncio(loop_scope="module")

RANDOM_CBAM = "resnet_small-cbam-random"
ALL_MODELS = [RANDOM_CBAM, "tiny-cbam", "tiny-gc", "tiny-se"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(model_repository: Path) -> AsyncIterator[Served]:
    settings = Settings(
        model_repository=model_repository,
        random_models=["resnet_small:cbam"],
        block_routes={"cbam": RANDOM_CBAM},
        max_batch_size=4,
        cpu_threads=2,
    )
    async with serve(settings) as running:
        yield running


def raw(data: bytes, kind: str = "image/jpeg") -> dict[str, Any]:
    return {"content": data, "headers": {"content-type": kind}}


def check_error(response: httpx.Response, status: int, error: str, *needles: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "detail"} and body["error"] == error
    for needle in needles:
        assert needle in str(body["detail"]), body


@module_loop
async def test_live_ready_and_models(served: Served) -> None:
    assert (await served.client.get("/health/live")).json() == {"status": "alive"}
    ready = await served.client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert set(ready.json()["models"]) == set(ALL_MODELS)
    models = {m["name"]: m for m in (await served.client.get("/v1/models")).json()["models"]}
    assert sorted(models) == ALL_MODELS
    assert models[RANDOM_CBAM]["random_weights"] and not models["tiny-se"]["random_weights"]
    assert models["tiny-gc"]["input_size"] == [3, 64, 64]
    assert models["tiny-gc"]["labels"][:2] == ["thing0", "thing1"]
    cbam_sites = models["tiny-cbam"]["sites"]
    assert [s["site"] for s in cbam_sites] == ["layer1.0.attn", "layer2.0.attn", "layer3.0.attn"]
    assert cbam_sites[0] == {
        "site": "layer1.0.attn",
        "block": "cbam",
        "kinds": ["channel", "spatial"],
    }
    assert {"context", "channel"} <= set(models["tiny-gc"]["sites"][0]["kinds"])
    docs = await served.client.get("/docs")
    assert docs.status_code == 200
    paths = (await served.client.get("/openapi.json")).json()["paths"]
    assert {"/v1/models", "/v1/models/{name}/predict", "/v1/predict", "/v1/compare"} <= set(paths)
    for path in ("/v1/models/{name}/predict", "/v1/predict", "/v1/compare"):
        query = {p["name"]: p for p in paths[path]["post"]["parameters"] if p["in"] == "query"}
        assert {"top_k", "maps", "map_size", "map_format"} <= set(query), path
        assert query["maps"]["schema"]["enum"] == ["none", "summary", "layers", "all"]


@module_loop
async def test_predict_raw_photo(served: Served, photo_files: dict) -> None:
    response = await served.client.post(
        "/v1/models/tiny-gc/predict", **raw(photo_files[("coffee", "jpeg")])
    )
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "tiny-gc" and len(body["results"]) == 1
    result = body["results"][0]
    probs = [p["probability"] for p in result["predictions"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
    assert all(p["label"] == f"thing{p['index']}" for p in result["predictions"])
    assert result["image"] == {"width": 600, "height": 400}
    summary = result["attention"]["summary"]
    assert summary["shape"] == [43, 64] and "layers" not in result["attention"]
    values = np.array(summary["data"])
    assert values.shape == (43, 64) and values.min() >= 0 and values.max() <= 1


@module_loop
async def test_input_forms_agree(served: Served, photo_files: dict) -> None:
    """Raw body, multipart and JSON base64 give the same answer for the same image."""
    jpeg = photo_files[("chelsea", "jpeg")]
    url = "/v1/models/tiny-cbam/predict?top_k=3"
    by_raw = await served.client.post(url, **raw(jpeg))
    by_form = await served.client.post(url, files={"image": ("cat.jpg", jpeg, "image/jpeg")})
    encoded = base64.b64encode(jpeg).decode()
    by_json = await served.client.post(url, json={"images": [encoded]})
    by_data_url = await served.client.post(
        url, json={"images": [f"data:image/jpeg;base64,{encoded}"]}
    )
    answers = [r.json()["results"] for r in (by_raw, by_form, by_json, by_data_url)]
    assert all(r.status_code == 200 for r in (by_raw, by_form, by_json, by_data_url))
    assert len(answers[0][0]["predictions"]) == 3
    assert all(np.allclose(_flat(a), _flat(answers[0]), atol=1e-5) for a in answers[1:])


def _flat(results: list[dict]) -> np.ndarray:
    probs = [p["probability"] for r in results for p in r["predictions"]]
    maps = [v for r in results for row in r["attention"]["summary"]["data"] for v in row]
    return np.array(probs + maps)


@module_loop
async def test_several_images_keep_their_order(served: Served, photo_files: dict, digits) -> None:
    files = [
        ("images", ("a.png", photo_files[("astronaut", "png")], "image/png")),
        ("images", ("b.jpg", photo_files[("china", "jpeg")], "image/jpeg")),
        ("images", ("c.png", digits[0][1], "application/octet-stream")),
    ]
    response = await served.client.post(
        "/v1/models/tiny-se/predict", files=files, data={"maps": "none", "top_k": "2"}
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    sizes = [(r["image"]["width"], r["image"]["height"]) for r in results]
    assert sizes == [(512, 512), (640, 427), (28, 28)]
    assert all(r["attention"] is None and len(r["predictions"]) == 2 for r in results)


@module_loop
async def test_json_options_override_query(served: Served, digits) -> None:
    images = [base64.b64encode(data).decode() for _, data in digits[:3]]
    response = await served.client.post(
        "/v1/models/tiny-cbam/predict?top_k=7&maps=all",
        json={"images": images, "top_k": 10, "maps": "none"},
    )
    results = response.json()["results"]
    assert len(results) == 3 and all(len(r["predictions"]) == 10 for r in results)
    assert all(r["attention"] is None for r in results)
    total = sum(p["probability"] for p in results[0]["predictions"])
    assert abs(total - 1.0) < 1e-3


@module_loop
@pytest.mark.parametrize(
    ("model", "kinds"),
    [
        ("tiny-cbam", {("spatial", False), ("channel", False)}),
        ("tiny-se", {("spatial", True), ("channel", False)}),
        ("tiny-gc", {("context", False), ("channel", False)}),
    ],
)
async def test_map_levels(served: Served, photo_files: dict, model: str, kinds: set) -> None:
    image = photo_files[("astronaut", "jpeg")]
    url = f"/v1/models/{model}/predict?map_size=32"
    layers = (await served.client.post(url + "&maps=layers", **raw(image))).json()
    every = (await served.client.post(url + "&maps=all", **raw(image))).json()
    models = (await served.client.get("/v1/models")).json()["models"]
    sites = next(m["sites"] for m in models if m["name"] == model)
    spatial = layers["results"][0]["attention"]["layers"]
    assert [e["layer"] for e in spatial] == [s["site"] for s in sites]
    assert all(e["shape"] == [32, 32] for e in spatial)
    assert all(e["kind"] in ("spatial", "context") for e in spatial)
    entries = every["results"][0]["attention"]["layers"]
    assert {(e["kind"], e["derived"]) for e in entries} == kinds
    channels = [e for e in entries if e["kind"] == "channel"]
    assert [e["shape"] for e in channels] == [[32], [64], [128]][-len(sites) :]
    assert all(len(e["data"]) == e["shape"][0] for e in channels)
    if model != "tiny-gc":  # gates are in (0, 1); GC's channel term is unbounded
        assert all(0 <= v <= 1 for e in entries for v in np.ravel(e["data"]))
    else:
        context = np.array(entries[0]["data"])
        assert context.min() >= 0 and context.mean() > 0.2  # h*w-scaled: uniform would be 1


@module_loop
async def test_png_maps(served: Served, photo_files: dict) -> None:
    response = await served.client.post(
        "/v1/models/tiny-cbam/predict?maps=all&map_format=png&map_size=48",
        **raw(photo_files[("chelsea", "png")], "image/png"),
    )
    attention = response.json()["results"][0]["attention"]
    summary = attention["summary"]
    assert "data" not in summary and summary["range"] == [0.0, 1.0]
    picture = Image.open(io.BytesIO(base64.b64decode(summary["png"])))
    assert picture.format == "PNG" and picture.size == (48, 32) and picture.mode == "RGB"
    for entry in attention["layers"]:
        if entry["kind"] == "channel":
            assert "data" in entry and "png" not in entry  # 1-D tensors stay numbers
        else:
            assert Image.open(io.BytesIO(base64.b64decode(entry["png"]))).size == (48, 32)


def crop_box(width: int, height: int, size: int, crop_pct: float) -> tuple[float, ...]:
    """The original-image box the model saw: shorter side -> size / crop_pct, centre crop."""
    short = int(size / crop_pct)
    scale = short / min(width, height)
    resized_w, resized_h = max(short, int(width * scale)), max(short, int(height * scale))
    left, top = round((resized_w - size) / 2), round((resized_h - size) / 2)
    return left / scale, top / scale, (left + size) / scale, (top + size) / scale


@module_loop
@pytest.mark.parametrize(
    ("model", "crop_pct", "photo", "transpose"),
    [("tiny-se", 1.0, "coffee", False), ("tiny-gc", 0.875, "china", True)],
)
async def test_map_geometry(
    served: Served, photos: dict, model: str, crop_pct: float, photo: str, transpose: bool
) -> None:
    """The summary covers the whole original image: zeros outside the crop, longest side 60."""
    array = photos[photo].transpose(1, 0, 2) if transpose else photos[photo]
    height, width = array.shape[:2]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    response = await served.client.post(
        f"/v1/models/{model}/predict?map_size=60", **raw(buffer.getvalue(), "image/png")
    )
    summary = np.array(response.json()["results"][0]["attention"]["summary"]["data"])
    rows, cols = summary.shape
    assert max(rows, cols) == 60 and abs(rows / cols - height / width) < 0.05
    x0, y0, x1, y1 = crop_box(width, height, 64, crop_pct)
    xs = (np.arange(cols) + 0.5) * width / cols
    ys = (np.arange(rows) + 0.5) * height / rows
    inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    assert not inside.all() and inside.any()
    assert np.all(summary[~inside] == 0)
    assert summary[inside].max() > 0.5


@module_loop
async def test_default_map_size_follows_small_images(served: Served, digits) -> None:
    """A 28 x 28 digit gets 28 x 28 maps unless the client asks for another map_size."""
    image = raw(digits[0][1], "image/png")
    url = "/v1/models/tiny-cbam/predict?maps=layers"
    default = (await served.client.post(url, **image)).json()["results"][0]
    assert default["image"] == {"width": 28, "height": 28}
    shapes = [default["attention"]["summary"]["shape"]]
    shapes += [e["shape"] for e in default["attention"]["layers"]]
    assert shapes and all(shape == [28, 28] for shape in shapes)
    asked = (await served.client.post(url + "&map_size=64", **image)).json()["results"][0]
    assert np.array(asked["attention"]["summary"]["data"]).shape == (64, 64)


@module_loop
async def test_predict_by_attention_block(served: Served, digits) -> None:
    image = raw(digits[1][1], "image/png")
    routed = await served.client.post("/v1/predict?attention=cbam&maps=none", **image)
    assert routed.json()["model"] == RANDOM_CBAM  # block_routes beats first-by-name
    first = await served.client.post("/v1/predict?attention=se&maps=none", **image)
    assert first.json()["model"] == "tiny-se"
    missing = await served.client.post("/v1/predict?attention=sk", **image)
    check_error(missing, 404, "unknown_model", "'sk'", "cbam", "gc", "se")


@module_loop
async def test_compare(served: Served, photo_files: dict) -> None:
    image = photo_files[("china", "jpeg")]
    every = (await served.client.post("/v1/compare?maps=summary", **raw(image))).json()
    assert every["models"] == ALL_MODELS
    assert [r["model"] for r in every["results"]] == ALL_MODELS
    assert all(r["attention"]["summary"]["shape"] == [43, 64] for r in every["results"])
    alone = (await served.client.post("/v1/models/tiny-gc/predict", **raw(image))).json()
    side = next(r for r in every["results"] if r["model"] == "tiny-gc")
    assert side["predictions"] == alone["results"][0]["predictions"]
    subset = await served.client.post("/v1/compare?models=tiny-se,tiny-gc&maps=none", **raw(image))
    assert [r["model"] for r in subset.json()["results"]] == ["tiny-se", "tiny-gc"]
    unknown = await served.client.post("/v1/compare?models=tiny-se,nope", **raw(image))
    check_error(unknown, 404, "unknown_model", "'nope'", "tiny-se")
    two = [("i", ("a.jpg", image, "image/jpeg")), ("i", ("b.jpg", image, "image/jpeg"))]
    check_error(await served.client.post("/v1/compare", files=two), 422, "invalid_options", "one")


@module_loop
async def test_client_errors(served: Served, photo_files: dict, digits) -> None:
    post = served.client.post
    url = "/v1/models/tiny-se/predict"
    digit = digits[0][1]
    check_error(
        await post("/v1/models/nope/predict", **raw(digit)), 404, "unknown_model", "tiny-se"
    )
    check_error(await post(url, **raw(b"hello", "text/plain")), 415, "unsupported_media_type",
                "text/plain", "image/png", "multipart/form-data")  # fmt: skip
    part = {"f": ("x.txt", b"hello", "text/plain")}
    check_error(await post(url, files=part), 415, "unsupported_media_type", "'f'")
    check_error(await post(url, **raw(b"not an image", "image/png")), 400, "invalid_image")
    truncated = photo_files[("coffee", "jpeg")][:2000]
    check_error(await post(url, **raw(truncated)), 400, "invalid_image")
    check_error(await post(url, **raw(b"", "image/png")), 400, "invalid_image", "empty")
    check_error(await post(url, json={"images": ["***"]}), 400, "invalid_image", "base64")
    check_error(await post(url, **raw(b"{", "application/json")), 400, "bad_request", "JSON")
    bad = await post(url + "?top_k=0&maps=bogus", **raw(digit, "image/png"))
    check_error(bad, 422, "invalid_options")
    assert {tuple(e["loc"]) for e in bad.json()["detail"]} == {
        ("query", "top_k"),
        ("query", "maps"),
    }
    extra = await post(url, json={"images": [base64.b64encode(digit).decode()], "topk": 3})
    check_error(extra, 422, "invalid_options", "topk")
    big = await post(url + "?map_size=100000", **raw(digit, "image/png"))
    check_error(big, 422, "invalid_options", "map_size")
    many = [("i", (f"{i}.png", digit, "image/png")) for i in range(33)]
    check_error(await post(url, files=many), 413, "payload_too_large", "33 images", "32")
    check_error(await served.client.get("/v1/nothing"), 404, "not_found")
    wrong_method = await served.client.get(url)  # the plain predict route keeps the 405
    check_error(wrong_method, 405, "method_not_allowed")
    assert "POST" in wrong_method.headers["allow"]


@module_loop
async def test_unexpected_errors_are_generic(served: Served) -> None:
    async def boom() -> None:
        raise RuntimeError("secret internals")

    served.app.add_api_route("/test-boom", boom)
    response = await served.client.get("/test-boom")
    check_error(response, 500, "internal_error")
    assert "secret" not in response.text and "Traceback" not in response.text


@module_loop
async def test_unexpected_errors_on_the_inference_routes_are_generic(
    served: Served, digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inference routes are served ahead of FastAPI's middleware (service.app.AttnServe):
    an unexpected error there still gets the generic 500 body and is counted."""

    async def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(served.app.state.services.pipeline, "predict", boom)
    response = await served.client.post(
        "/v1/models/tiny-se/predict", **raw(digits[2][1], "image/png")
    )
    check_error(response, 500, "internal_error")
    assert "secret" not in response.text and "Traceback" not in response.text
    text = (await served.client.get("/metrics")).text
    assert 'model="tiny-se",route="/v1/models/{name}/predict",status="500"' in text


@module_loop
async def test_metrics(served: Served, digits) -> None:
    await served.client.post("/v1/models/tiny-se/predict", **raw(digits[2][1], "image/png"))
    text = (await served.client.get("/metrics")).text
    assert (
        'attnserve_requests_total{model="tiny-se",route="/v1/models/{name}/predict",status="200"}'
        in text
    )
    for name in (
        "attnserve_request_duration_seconds_bucket",
        "attnserve_queue_wait_seconds_bucket",
        'attnserve_batch_size_bucket{le="1.0",model="tiny-se",version="1"}',
        "attnserve_inference_duration_seconds_bucket",
        'attnserve_queue_depth{model="tiny-se",version="1"}',
        'le="0.001"',
        'le="30.0"',
    ):
        assert name in text
    assert "attnserve_device_memory_bytes{" not in text  # CPU: gauge declared, no samples
    # prometheus-client's standard collectors, on the app's own registry
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
        assert name in text
    assert 'python_gc_collections_total{generation="2"}' in text


@pytest.fixture(scope="module")
def broken_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-se plus a package whose weights no longer match its card."""
    root = tmp_path_factory.mktemp("broken")
    shutil.copytree(model_repository / "tiny-se", root / "tiny-se")
    shutil.copytree(model_repository / "tiny-cbam", root / "tiny-bad")
    card = json.loads((root / "tiny-bad" / "card.json").read_text())
    (root / "tiny-bad" / "card.json").write_text(json.dumps({**card, "name": "tiny-bad"}))
    (root / "tiny-bad" / "model.safetensors").write_bytes(b"corrupted")
    return root


@module_loop
async def test_not_ready_and_limits(broken_repository: Path, photo_files: dict) -> None:
    settings = Settings(
        model_repository=broken_repository,
        max_body_bytes=80 * 1024,
        max_image_pixels=250_000,
        max_images_per_request=2,
        cpu_threads=1,
        instances=1,  # one device thread, which the test blocks
    )
    async with serve(settings, ready=False) as served:
        hold = threading.Event()
        blocker = asyncio.ensure_future(served.services.worker.run(hold.wait))
        try:
            assert (await served.client.get("/health/live")).status_code == 200
            check_error(
                await served.client.get("/health/ready"), 503, "not_ready", "loading ", "/2"
            )
            jpeg = photo_files[("coffee", "jpeg")]
            early = await served.client.post("/v1/models/tiny-se/predict", **raw(jpeg))
            check_error(early, 503, "not_ready", "tiny-se", "/2 models loaded")
        finally:
            hold.set()
            await blocker
        await wait_loaded(served)
        ready = await served.client.get("/health/ready")
        check_error(ready, 503, "not_ready", "tiny-bad failed to load", "package is invalid")
        assert ready.json()["models"]["tiny-se"]["status"] == "ready"
        broken = await served.client.post("/v1/models/tiny-bad/predict", **raw(jpeg))
        check_error(broken, 503, "not_ready", "failed")
        for answer in (ready, broken):  # the checksum and the path go to the log only
            for secret in ("sha256", "PackageError", str(broken_repository)):
                assert secret not in answer.text, answer.text
        served.services.settings.readiness = "any"  # tiny-se serves, so the server is ready
        ready_any = await served.client.get("/health/ready")
        assert ready_any.status_code == 200, ready_any.text
        assert ready_any.json()["models"]["tiny-bad"]["status"] == "failed"
        served.services.settings.readiness = "all"
        await _check_limits(served.client, photo_files)


async def _check_limits(client: httpx.AsyncClient, photo_files: dict) -> None:
    url = "/v1/models/tiny-se/predict"
    assert (await client.post(url, **raw(photo_files[("coffee", "jpeg")]))).status_code == 200
    big_png = photo_files[("china", "png")]
    check_error(await client.post(url, **raw(big_png, "image/png")), 413, "payload_too_large",
                "Content-Length", "81920")  # fmt: skip

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big_png), 8192):
            yield big_png[start : start + 8192]

    streamed = await client.post(url, content=chunks(), headers={"content-type": "image/png"})
    assert "content-length" not in streamed.request.headers
    check_error(streamed, 413, "payload_too_large", "while streaming")
    check_error(await client.post(url, **raw(photo_files[("astronaut", "jpeg")])), 413,
                "payload_too_large", "512x512", "250000")  # fmt: skip
    bomb = io.BytesIO()
    Image.new("L", (4000, 3000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 80 * 1024  # tiny file, 12 megapixels
    check_error(await client.post(url, **raw(bomb.getvalue(), "image/png")), 413,
                "payload_too_large", "4000x3000")  # fmt: skip
    three = [
        ("i", (f"{i}.jpg", photo_files[("coffee", "jpeg")][:10], "image/jpeg")) for i in range(3)
    ]
    check_error(await client.post(url, files=three), 413, "payload_too_large", "3 images")


class DepthLog:
    """Wraps the app's real Metrics.on_queue_depth to remember every depth the batcher reported."""

    def __init__(self, services: Services) -> None:
        self.depths: list[int] = []
        self._inner = services.metrics.on_queue_depth
        services.metrics.on_queue_depth = self  # type: ignore[method-assign]

    def __call__(self, name: str, depth: int, version: str = "1") -> None:
        self.depths.append(depth)
        self._inner(name, depth, version)

    @property
    def submitted(self) -> int:
        """Items queued so far: every rise of the depth is one submit."""
        steps = zip([0, *self.depths], self.depths, strict=False)
        return sum(max(0, after - before) for before, after in steps)

    async def wait_for(self, *pattern: int, submitted: int = 0) -> None:
        """Until the reported depths end with `pattern` after at least `submitted` submits."""
        async with asyncio.timeout(10):
            while self.depths[-len(pattern) :] != list(pattern) or self.submitted < submitted:
                await asyncio.sleep(0.005)


@module_loop
async def test_busy_worker(model_repository: Path, digits) -> None:
    """A blocked device: queue full (503 + Retry-After), deadline (504), readiness, disconnect."""
    settings = Settings(
        model_repository=model_repository,
        models=["tiny-se"],
        max_batch_size=1,
        max_queue_size=1,
        request_timeout_s=1.5,
        instances=1,  # one device thread, which the test blocks
    )
    async with serve(settings) as served:
        served.services.ready_check_timeout_s = 0.2
        log = DepthLog(served.services)
        post = served.client.post
        url = "/v1/models/tiny-se/predict?maps=none"
        image = raw(digits[3][1], "image/png")
        hold = threading.Event()
        blocker = asyncio.ensure_future(served.services.worker.run(hold.wait))
        try:
            first = asyncio.ensure_future(post(url, **image))
            await log.wait_for(1, 0)  # queued, then taken into a batch that waits for the device
            second = asyncio.ensure_future(post(url, **image))
            await log.wait_for(1)  # waiting in the queue, which is now full
            full = await post(url, **image)
            check_error(full, 503, "queue_full", "full")
            assert int(full.headers["retry-after"]) >= 1
            ready = await served.client.get("/health/ready")
            check_error(ready, 503, "not_ready", "worker not responding")
            for late in await asyncio.gather(first, second):
                check_error(late, 504, "deadline_exceeded", "1.5s")
            await _disconnect_drops_request(served, log, image["content"])
        finally:
            hold.set()
            await blocker
        async with asyncio.timeout(10):
            while (await served.client.get("/health/ready")).status_code != 200:
                await asyncio.sleep(0.05)
        batches = served.services.metrics.registry.get_sample_value(
            "attnserve_batch_size_count", {"model": "tiny-se", "version": "1"}
        )
        assert batches == 1  # only the first request reached the device; the others were dropped
        metrics = (await served.client.get("/metrics")).text
        assert 'route="/v1/models/{name}/predict",status="503"' in metrics
        assert 'route="/v1/models/{name}/predict",status="504"' in metrics


async def _disconnect_drops_request(served: Served, log: DepthLog, png: bytes) -> None:
    """A client that leaves while queued gets its item cancelled (never reaches the device)."""
    gone = asyncio.Event()
    sent: list[dict[str, Any]] = []
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": png, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/models/tiny-se/predict", "raw_path": b"",
        "query_string": b"maps=none", "root_path": "", "server": ("attnserve", 80),
        "client": ("127.0.0.1", 1), "headers": [(b"content-type", b"image/png")],
    }  # fmt: skip
    log.depths.clear()
    call = asyncio.ensure_future(served.app(scope, receive, send))
    await log.wait_for(1)
    gone.set()
    await asyncio.wait_for(call, 5)
    assert sent[0]["status"] == 499
    assert served.services.registry.get("tiny-se").batcher.queue_depth in (0, 1)


@module_loop
async def test_shutdown_drains_in_flight_requests(model_repository: Path, digits) -> None:
    settings = Settings(
        model_repository=model_repository,
        models=["tiny-cbam"],
        max_batch_size=1,
        instances=1,  # one device thread, which the test blocks
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://attnserve") as client:
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        served = Served(app, client)
        await wait_loaded(served)
        hold = threading.Event()
        blocker = asyncio.ensure_future(served.services.worker.run(hold.wait))
        try:
            log = DepthLog(served.services)
            url = "/v1/models/tiny-cbam/predict"
            in_flight = [
                asyncio.ensure_future(client.post(url, **raw(d, "image/png")))
                for _, d in digits[:3]
            ]
            await log.wait_for(2, submitted=3)  # one batch waits for the device, two are queued
            stopping = asyncio.ensure_future(lifespan.__aexit__(None, None, None))
            await asyncio.sleep(0.05)
            refused = await client.post(url, **raw(digits[4][1], "image/png"))
            check_error(refused, 503, "shutting_down")
        finally:
            hold.set()  # a failed check must not leave the device thread blocked
        await blocker
        answers = await asyncio.gather(*in_flight)
        assert [a.status_code for a in answers] == [200, 200, 200]
        await stopping
        assert served.services.registry.get("tiny-cbam").status == "stopped"


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, model_repository) -> None:
    monkeypatch.setenv("ATTNSERVE_MODELS", "tiny-se, tiny-gc")
    monkeypatch.setenv("ATTNSERVE_RANDOM_MODELS", "resnet_small:eca")
    monkeypatch.setenv("ATTNSERVE_BLOCK_ROUTES", '{"se": "tiny-se"}')
    monkeypatch.setenv("ATTNSERVE_MODEL_REPOSITORY", str(model_repository))
    settings = Settings()
    assert settings.models == ["tiny-se", "tiny-gc"]
    assert settings.random_models == ["resnet_small:eca"]
    assert settings.block_routes == {"se": "tiny-se"}
    names = sorted(create_app(settings).state.services.registry.models)
    assert names == ["resnet_small-eca-random", "tiny-gc", "tiny-se"]
    assert Settings(model_repository=model_repository).model_repository == model_repository
    assert Settings.model_fields["model_repository"].default_factory().name == "zoo"


def test_configuration_errors(model_repository: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown model\(s\) \['nope'\]; available: .*tiny-se"):
        create_app(Settings(model_repository=model_repository, models=["nope"]))
    with pytest.raises(ConfigError, match="unknown arch 'resnet9'"):
        create_app(Settings(model_repository=model_repository, random_models=["resnet9:se"]))
    with pytest.raises(ConfigError, match="'tiny-se' uses block 'se'"):
        create_app(Settings(model_repository=model_repository, block_routes={"cbam": "tiny-se"}))
    with pytest.raises(ConfigError, match="not a directory"):
        create_app(Settings(model_repository=tmp_path / "missing"))
    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings(max_batch_size=2000)


def test_empty_repository_serves_random_digit_models(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.registry"):
        app = create_app(Settings(model_repository=tmp_path, models=["digits-se", "digits-sk"]))
    assert "holds no model packages" in caplog.text
    models = [m.info() for m in app.state.services.registry.models.values()]
    assert [(m["name"], m["arch"], m["random_weights"]) for m in models] == [
        ("digits-se", "resnet_small", True),
        ("digits-sk", "resnet_small", True),
    ]
    with pytest.raises(ConfigError, match="digits-cbam"):
        create_app(Settings(model_repository=tmp_path, models=["tiny-se"]))


@module_loop
@pytest.mark.parametrize("enabled", [False, True])
async def test_opentelemetry_setting_decides_whether_requests_look_for_a_provider(
    model_repository: Path, monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    """FastAPI's own OpenTelemetry looks up the global tracer provider on every request; with
    the setting off (the default) no request does."""
    from opentelemetry import trace

    lookups = []
    original = trace.get_tracer_provider

    def counting() -> Any:
        lookups.append(1)
        return original()

    monkeypatch.setattr(trace, "get_tracer_provider", counting)
    settings = Settings(
        model_repository=model_repository, models=["tiny-se"], opentelemetry=enabled
    )
    async with serve(settings) as served:
        before = len(lookups)
        for _ in range(3):
            assert (await served.client.get("/health/live")).status_code == 200
        assert (len(lookups) - before >= 3) is enabled
