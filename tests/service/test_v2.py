"""The Open Inference Protocol (/v2) in-process: metadata, JSON and binary inference, errors.

Apps run their real lifespan over the temporary repository of real packages; binary bodies are
built and parsed by hand from the protocol's description (JSON header, then little-endian data;
BYTES elements as a 4-byte length and the bytes), so the test does not trust the server's codec.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import pytest_asyncio
from inprocess import Served, serve, wait_loaded

from service.imaging import prepare
from service.settings import Settings
from service.state import Services

module_loop = pytest.mark.asyncio(loop_scope="module")
LENGTH = "Inference-Header-Content-Length"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(model_repository: Path) -> AsyncIterator[Served]:
    settings = Settings(
        model_repository=model_repository, max_batch_size=4, cpu_threads=2, instances=1
    )  # one device thread: tests block it to hold batches
    async with serve(settings) as running:
        yield running


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def images_input(files: list[bytes]) -> dict[str, Any]:
    return {
        "name": "image",
        "datatype": "BYTES",
        "shape": [len(files)],
        "data": list(map(b64, files)),
    }


def tensor(datatype: str, array: Any) -> dict[str, Any]:
    """A JSON input "input" holding `array` (nested lists, as clients send them)."""
    values = np.asarray(array)
    return {
        "name": "input",
        "datatype": datatype,
        "shape": list(values.shape),
        "data": values.tolist(),
    }


def binary_input(name: str, datatype: str, shape: list[int], size: int) -> dict[str, Any]:
    parameters = {"binary_data_size": size}
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": parameters}


def infer_request(entry: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"inputs": [entry]}
    if outputs is not None:
        request["outputs"] = [{"name": name} for name in outputs]
    return request


def output(response: httpx.Response, name: str) -> np.ndarray:
    """A JSON output as an array of its shape."""
    assert response.status_code == 200, response.text
    entry = next(o for o in response.json()["outputs"] if o["name"] == name)
    return np.array(entry["data"]).reshape(entry["shape"])


def pack_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def binary_request(header: dict[str, Any], chunks: list[bytes]) -> dict[str, Any]:
    """httpx kwargs for a binary-extension body: JSON header, then the inputs' raw bytes."""
    head = orjson.dumps(header)
    return {
        "content": head + b"".join(chunks),
        "headers": {LENGTH: str(len(head)), "content-type": "application/octet-stream"},
    }


def parse_binary(response: httpx.Response) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, {name: array or list of bytes}) of a binary-extension response, by hand."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    size = int(response.headers[LENGTH])
    header = orjson.loads(response.content[:size])
    offset, values = size, {}
    for out in header["outputs"]:
        if "data" in out:
            values[out["name"]] = out["data"]
            continue
        raw = response.content[offset : offset + out["parameters"]["binary_data_size"]]
        offset += len(raw)
        if out["datatype"] == "BYTES":
            items, at = [], 0
            while at < len(raw):
                (n,) = struct.unpack_from("<I", raw, at)
                items.append(raw[at + 4 : at + 4 + n])
                at += 4 + n
            values[out["name"]] = items
        else:
            assert out["datatype"] == "FP32"
            values[out["name"]] = np.frombuffer(raw, dtype="<f4").reshape(out["shape"])
    assert offset == len(response.content)
    return header, values


@contextlib.contextmanager
def depth_log(services: Services) -> Iterator[list[int]]:
    """Every queue depth the batchers report while inside (wraps the app's real Metrics)."""
    depths: list[int] = []
    inner = services.metrics.on_queue_depth

    def record(name: str, depth: int, version: str = "1") -> None:
        depths.append(depth)
        inner(name, depth, version)

    services.metrics.on_queue_depth = record  # type: ignore[method-assign]
    try:
        yield depths
    finally:
        services.metrics.on_queue_depth = inner  # type: ignore[method-assign]


async def wait_for(depths: list[int], *pattern: int) -> None:
    """Until the reported depths end with `pattern`."""
    async with asyncio.timeout(10):
        while depths[-len(pattern) :] != list(pattern):
            await asyncio.sleep(0.005)


def check_error(response: httpx.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    for needle in needles:
        assert needle in body["error"], body
    if status == 503:
        assert int(response.headers["retry-after"]) >= 1


@module_loop
async def test_metadata_and_health(served: Served) -> None:
    client = served.client
    server = (await client.get("/v2")).json()
    assert server["name"] == "attnserve" and server["version"] == version("attnserve")
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).status_code == 200
    for path in ("/v2/models/tiny-se/ready", "/v2/models/tiny-se/versions/1/ready"):
        assert (await client.get(path)).status_code == 200
    meta = (await client.get("/v2/models/tiny-cbam")).json()
    assert meta == (await client.get("/v2/models/tiny-cbam/versions/1")).json()
    assert meta["name"] == "tiny-cbam" and meta["versions"] == ["1"]
    assert meta["platform"] == "pytorch_attnserve"
    assert meta["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "input", "datatype": "FP32", "shape": [-1, 1, 64, 64]},
    ]
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["probabilities"] == {
        "name": "probabilities",
        "datatype": "FP32",
        "shape": [-1, 10],
    }
    assert outputs["attention_summary"]["shape"] == [-1, -1, -1]
    assert outputs["attention/layer1.0.attn/spatial"]["shape"] == [-1, -1, -1]
    assert outputs["attention/layer3.0.attn/channel"]["shape"] == [-1, -1]
    gc = (await client.get("/v2/models/tiny-gc")).json()
    assert gc["inputs"][1]["shape"] == [-1, 3, 64, 64]
    assert gc["parameters"]["mean"] == "0.485,0.456,0.406"
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert {"/v2", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"} <= set(
        paths
    )


async def v1_result(served: Served, model: str, image: bytes) -> tuple[np.ndarray, np.ndarray]:
    """All probabilities by class index and the summary map, from /v1."""
    response = await served.client.post(
        f"/v1/models/{model}/predict?top_k=1000", json={"images": [b64(image)]}
    )
    result = response.json()["results"][0]
    probs = np.zeros(len(result["predictions"]))
    for p in result["predictions"]:
        probs[p["index"]] = p["probability"]
    return probs, np.array(result["attention"]["summary"]["data"])


@module_loop
@pytest.mark.parametrize(("model", "photo"), [("tiny-gc", "coffee"), ("tiny-cbam", "chelsea")])
async def test_json_images_equal_v1(
    served: Served, photo_files: dict, model: str, photo: str
) -> None:
    image = photo_files[(photo, "jpeg")]
    response = await served.infer(model, {"id": "req-7", "inputs": [images_input([image])]})
    assert response.headers["content-type"] == "application/json" and LENGTH not in response.headers
    body = response.json()
    assert body["id"] == "req-7" and body["model_name"] == model and body["model_version"] == "1"
    assert [o["name"] for o in body["outputs"]] == ["probabilities", "attention_summary"]
    probs, summary = output(response, "probabilities"), output(response, "attention_summary")
    v1_probs, v1_summary = await v1_result(served, model, image)
    assert probs.shape == (1, 10) and np.allclose(probs[0], v1_probs, atol=1e-5)
    assert summary.shape == (1, *v1_summary.shape)  # mapped to the original image, like v1
    assert np.allclose(summary[0], v1_summary, atol=1e-3)
    assert body["outputs"][1]["parameters"] == {"grid": "original"}


@module_loop
async def test_ragged_images_use_the_input_grid(served: Served, photo_files: dict) -> None:
    files = [photo_files[("coffee", "jpeg")], photo_files[("astronaut", "png")]]
    request = {"inputs": [{**images_input(files), "shape": [2, 1]}]}
    response = await served.infer("tiny-gc", request)
    assert output(response, "attention_summary").shape == (2, 64, 64)
    assert response.json()["outputs"][1]["parameters"] == {"grid": "input"}
    probs = output(response, "probabilities")
    for row, image in zip(probs, files, strict=True):
        assert np.allclose(row, (await v1_result(served, "tiny-gc", image))[0], atol=1e-5)


@module_loop
async def test_tensor_inputs(served: Served, photo_files: dict) -> None:
    """FP32 preprocessed like the model expects equals the image path; UINT8 is normalised."""
    image = photo_files[("china", "jpeg")]
    config = served.services.registry.get("tiny-gc").data_config
    (prepared,) = prepare(image, [config], max_pixels=10**8)
    by_tensor = await served.infer("tiny-gc", infer_request(tensor("FP32", prepared.tensor[None])))
    by_image = await served.infer("tiny-gc", infer_request(images_input([image])))
    expected = output(by_image, "probabilities")
    assert np.allclose(output(by_tensor, "probabilities"), expected, atol=1e-5)
    assert output(by_tensor, "attention_summary").shape == (1, 64, 64)
    assert by_tensor.json()["outputs"][1]["parameters"] == {"grid": "input"}
    pixels = np.random.default_rng(0).integers(0, 256, (2, 1, 64, 64), dtype=np.uint8)
    meta = (await served.client.get("/v2/models/tiny-se")).json()["parameters"]
    mean, std = float(meta["mean"]), float(meta["std"])  # one channel
    normalised = (pixels / 255.0 - mean) / std
    outputs = ["probabilities"]
    first = await served.infer("tiny-se", infer_request(tensor("UINT8", pixels), outputs))
    second = await served.infer("tiny-se", infer_request(tensor("FP32", normalised), outputs))
    assert [o["name"] for o in first.json()["outputs"]] == ["probabilities"]
    assert np.allclose(output(first, "probabilities"), output(second, "probabilities"), atol=1e-5)


@module_loop
async def test_binary_round_trip(served: Served, photo_files: dict, digits: list) -> None:
    files = [digits[0][1], digits[5][1], photo_files[("coffee", "png")]]
    packed = pack_bytes(files)
    header = infer_request(binary_input("image", "BYTES", [3], len(packed)))
    header["id"] = "bin"
    header["outputs"] = [
        {"name": "probabilities", "parameters": {"binary_data": True}},
        {"name": "attention_summary", "parameters": {"binary_data": False}},
    ]
    url = "/v2/models/tiny-se/infer"
    head, values = parse_binary(await served.client.post(url, **binary_request(header, [packed])))
    assert head["id"] == "bin"
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 3 * 10 * 4}
    by_json = await served.infer("tiny-se", infer_request(images_input(files)))
    assert np.allclose(values["probabilities"], output(by_json, "probabilities"), atol=1e-6)
    summary = np.reshape(values["attention_summary"], (3, 64, 64))
    assert np.allclose(summary, output(by_json, "attention_summary"))
    pixels = np.random.default_rng(1).normal(size=(2, 1, 64, 64)).astype("<f4")
    header = infer_request(binary_input("input", "FP32", [2, 1, 64, 64], pixels.nbytes))
    header["parameters"] = {"binary_data_output": True}
    response = await served.client.post(url, **binary_request(header, [pixels.tobytes()]))
    head, values = parse_binary(response)
    assert [o["name"] for o in head["outputs"]] == ["probabilities", "attention_summary"]
    assert values["attention_summary"].shape == (2, 64, 64)
    by_json = await served.infer("tiny-se", infer_request(tensor("FP32", pixels)))
    assert np.allclose(values["probabilities"], output(by_json, "probabilities"), atol=1e-6)


@module_loop
async def test_classification(served: Served, photo_files: dict) -> None:
    files = [photo_files[("coffee", "jpeg")], photo_files[("china", "jpeg")]]
    request = infer_request(images_input(files))
    probs = output(await served.infer("tiny-gc", request), "probabilities")
    request["outputs"] = [{"name": "probabilities", "parameters": {"classification": 3}}]
    entry = (await served.infer("tiny-gc", request)).json()["outputs"][0]
    assert entry["datatype"] == "BYTES" and entry["shape"] == [2, 3]
    rows = np.array(entry["data"]).reshape(2, 3)
    for row, expected in zip(rows, probs, strict=True):
        parsed = [s.split(":") for s in row]
        values = [float(v) for v, _, _ in parsed]
        assert values == sorted(values, reverse=True)
        assert [int(i) for _, i, _ in parsed] == list(np.argsort(-expected)[:3])
        assert all(label == f"thing{i}" for _, i, label in parsed)
        assert np.allclose(values, np.sort(expected)[::-1][:3], atol=1e-6)
    request["outputs"][0]["parameters"] = {"classification": 50, "binary_data": True}
    head, values = parse_binary(await served.infer("tiny-gc", request))
    assert head["outputs"][0]["shape"] == [2, 10] and len(values["probabilities"]) == 20
    assert values["probabilities"][:3] == [s.encode() for s in rows[0]]


@module_loop
async def test_site_outputs(served: Served, photo_files: dict) -> None:
    image = photo_files[("astronaut", "jpeg")]
    names = ["attention/layer1.0.attn/spatial", "attention/layer3.0.attn/channel"]
    request = infer_request(images_input([image, image]), names)
    response = await served.infer("tiny-cbam", request)
    spatial, channel = output(response, names[0]), output(response, names[1])
    assert spatial.shape == (2, 32, 32) and channel.shape == (2, 128)
    assert spatial.min() >= 0 and spatial.max() <= 1 and channel.min() >= 0 and channel.max() <= 1
    assert np.allclose(spatial[0], spatial[1])
    meta = (await served.client.get("/v2/models/tiny-gc")).json()
    context = next(o["name"] for o in meta["outputs"] if o["name"].endswith("/context"))
    request = {"inputs": [images_input([image])], "outputs": [{"name": context}]}
    mask = output(await served.infer("tiny-gc", request), context)
    assert mask.ndim == 3 and abs(mask.mean() - 1.0) < 1e-4  # softmax mask scaled by h*w


@module_loop
async def test_compressed_requests(served: Served, digits: list) -> None:
    body = orjson.dumps({"inputs": [images_input([digits[1][1]])]})
    plain = await served.client.post("/v2/models/tiny-se/infer", content=body)
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        response = await served.client.post(
            "/v2/models/tiny-se/infer", content=packed, headers={"content-encoding": encoding}
        )
        assert np.array_equal(output(response, "probabilities"), output(plain, "probabilities"))
    post = served.client.post
    url = "/v2/models/tiny-se/infer"
    check_error(await post(url, content=body, headers={"content-encoding": "br"}), 415, "br")
    broken = gzip.compress(body)[:-12]
    check_error(await post(url, content=broken, headers={"content-encoding": "gzip"}), 400)


@module_loop
async def test_v1_and_v2_share_batches(served: Served, digits: list) -> None:
    """Items from both protocols wait in the same queue and run as one batch."""
    metrics = served.services.metrics.registry

    def batches() -> tuple[float, float]:
        labels = {"model": "tiny-se", "version": "1"}
        count = metrics.get_sample_value("attnserve_batch_size_count", labels) or 0.0
        return count, metrics.get_sample_value("attnserve_batch_size_sum", labels) or 0.0

    before = batches()
    hold = threading.Event()
    blocker = asyncio.ensure_future(served.services.worker.run(hold.wait))
    v1 = "/v1/models/tiny-se/predict?maps=none"
    try:
        with depth_log(served.services) as depths:
            first = asyncio.ensure_future(
                served.client.post(v1, json={"images": [b64(digits[2][1])]})
            )
            await wait_for(depths, 1, 0)  # queued, then taken into a batch waiting for the device
            later = [
                asyncio.ensure_future(served.client.post(v1, json={"images": [b64(digits[3][1])]})),
                asyncio.ensure_future(
                    served.infer("tiny-se", {"inputs": [images_input([d for _, d in digits[4:6]])]})
                ),
            ]
            await wait_for(depths, 3)
    finally:
        hold.set()
        await blocker
    answers = await asyncio.gather(first, *later)
    assert [a.status_code for a in answers] == [200, 200, 200]
    after = batches()
    assert (after[0] - before[0], after[1] - before[1]) == (2, 4)  # sizes 1, then 3 (v1 + 2 x v2)
    text = (await served.client.get("/metrics")).text
    assert 'model="tiny-se",route="/v2/models/{name}/infer",status="200"' in text


def bad_requests(good: dict[str, Any]) -> list[tuple[Any, str]]:
    """(request, a phrase of the expected message) pairs that must each be answered with 400."""
    zeros = np.zeros((1, 1, 64, 64))
    with_outputs = {"inputs": [good], "outputs": [{"name": "probabilities"}] * 2}
    classify_map = {"name": "attention_summary", "parameters": {"classification": 2}}
    return [
        (b"{", "JSON"),
        ({"inputs": []}, "inputs"),
        (infer_request({**good, "datatype": "BF16"}), "BF16"),
        (infer_request({**good, "datatype": "INT32", "data": [1]}), "'image' must be BYTES"),
        (infer_request({**good, "shape": [2]}), "base64 strings"),
        (infer_request({**good, "shape": [1, 2], "data": good["data"] * 2}), "[N, 1]"),
        (infer_request({**good, "shape": [0], "data": []}), "batch size 0"),
        (infer_request({**good, "data": ["***"]}), "base64"),
        (infer_request({**good, "data": [b64(b"not an image")]}), "cannot identify"),
        (infer_request({**good, "name": "pixels"}), "'pixels'"),
        ({"inputs": [good, good]}, "exactly one input"),
        (infer_request(tensor("FP32", np.zeros((1, 3, 64, 64)))), "[-1, 1, 64, 64]"),
        (infer_request(tensor("FP16", zeros)), "FP32 or UINT8"),
        (infer_request(tensor("UINT8", zeros.astype(int) + 300)), "outside the UINT8 range"),
        (infer_request(tensor("UINT8", zeros + 0.5)), "must be integers"),
        (infer_request({**tensor("FP32", zeros), "data": [[1.0, 2.0], [3.0]]}), "regular"),
        (infer_request({**tensor("FP32", zeros), "data": ["1.0"] * 64 * 64}), "numbers"),
        (infer_request({**tensor("FP32", zeros), "shape": [1, 1, 64, 63]}), "elements"),
        (infer_request(good, ["logits"]), "'logits'"),
        ({"inputs": [good], "outputs": [classify_map]}, "classification"),
        (with_outputs, "distinct"),
        ({"inputs": [good], "parameters": {"binary_data_output": "yes"}}, "binary_data_output"),
        ({"inputs": [good], "id": 7}, "id"),
    ]


@module_loop
async def test_errors(served: Served, digits: list) -> None:
    post, get = served.client.post, served.client.get
    url = "/v2/models/tiny-se/infer"
    good = images_input([digits[0][1]])
    check_error(await post("/v2/models/nope/infer", json=infer_request(good)), 404, "tiny-se")
    other_version = "/v2/models/tiny-se/versions/2/infer"
    check_error(await post(other_version, json=infer_request(good)), 404, "'2'")
    versioned = await post("/v2/models/tiny-se/versions/1/infer", json=infer_request(good))
    assert versioned.status_code == 200 and versioned.json()["model_version"] == "1"
    check_error(await get("/v2/models/nope"), 404, "nope")
    check_error(await get("/v2/models/tiny-se/versions/3"), 404, "'3'")
    check_error(await get("/v2/models/nope/ready"), 404)
    check_error(await get("/v2/nothing"), 404)
    check_error(await get(url), 405)
    for body, needle in bad_requests(good):
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        check_error(await post(url, content=content), 400, needle)
    packed = pack_bytes([digits[0][1]])
    header = infer_request(binary_input("image", "BYTES", [1], len(packed) + 1))
    check_error(await post(url, **binary_request(header, [packed])), 400, "binary_data_size")
    header = infer_request(binary_input("image", "BYTES", [1], len(packed)))
    check_error(await post(url, **binary_request(header, [packed, b"xx"])), 400, "2 bytes")
    short = infer_request(binary_input("image", "BYTES", [1], len(packed) - 5))
    check_error(await post(url, **binary_request(short, [packed[:-5]])), 400, "truncated")
    two = pack_bytes([digits[0][1], digits[1][1]])
    miscounted = infer_request(binary_input("image", "BYTES", [1], len(two)))
    check_error(await post(url, **binary_request(miscounted, [two])), 400, "2 BYTES elements")
    wrong_length = binary_request(header, [packed])
    wrong_length["headers"][LENGTH] = "999999999"
    check_error(await post(url, **wrong_length), 400, LENGTH)
    assert (await post(url, **binary_request(header, [packed]))).status_code == 200
    nan = np.full((1, 1, 64, 64), np.nan, dtype="<f4")
    header = infer_request(binary_input("input", "FP32", [1, 1, 64, 64], nan.nbytes))
    check_error(await post(url, **binary_request(header, [nan.tobytes()])), 400, "NaN")
    v1 = (await post("/v1/models/nope/predict", content=b"x")).json()
    assert set(v1) == {"error", "detail", "request_id"}  # /v1 keeps its own error shape


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def limited(model_repository: Path) -> AsyncIterator[Served]:
    settings = Settings(
        model_repository=model_repository,
        models=["tiny-se"],
        max_body_bytes=64 * 1024,
        max_images_per_request=2,
        max_batch_size=1,
        max_queue_size=1,
        request_timeout_s=1.0,
        cpu_threads=1,
        instances=1,  # one device thread, which the tests block
    )
    async with serve(settings, ready=False) as running:
        yield running


@module_loop
async def test_ready_while_loading(limited: Served, digits: list) -> None:
    client = limited.client
    hold = threading.Event()
    blocker = asyncio.ensure_future(limited.services.worker.run(hold.wait))
    try:
        assert (await client.get("/v2/health/live")).status_code == 200
        check_error(await client.get("/v2/health/ready"), 503, "loading 0/1")
        check_error(await client.get("/v2/models/tiny-se/ready"), 503, "tiny-se")
        check_error(await client.get("/v2/models/tiny-se"), 503, "tiny-se")
        request = {"inputs": [images_input([digits[0][1]])]}
        check_error(await limited.infer("tiny-se", request), 503, "tiny-se")
    finally:
        hold.set()
        await blocker
    await wait_loaded(limited)
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    assert (await client.get("/v2/models/tiny-se/ready")).status_code == 200


@module_loop
async def test_size_limits(limited: Served, photo_files: dict, digits: list) -> None:
    url = "/v2/models/tiny-se/infer"
    post = limited.client.post
    await wait_loaded(limited)
    big = orjson.dumps({"inputs": [images_input([photo_files[("china", "png")]])]})
    check_error(await post(url, content=big), 413, "Content-Length")

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    check_error(await post(url, content=chunks()), 413, "while streaming")
    padded = orjson.dumps({"inputs": [images_input([digits[0][1]])], "id": " " * 100_000})
    bomb = gzip.compress(padded)
    assert len(bomb) < 8 * 1024
    response = await post(url, content=bomb, headers={"content-encoding": "gzip"})
    check_error(response, 413, "decompressed")
    three = {"inputs": [images_input([d for _, d in digits[:3]])]}
    check_error(await limited.infer("tiny-se", three), 413, "3 items")


@module_loop
async def test_queue_full_and_deadline(limited: Served, digits: list) -> None:
    await wait_loaded(limited)
    request = {"inputs": [images_input([digits[7][1]])]}
    hold = threading.Event()
    blocker = asyncio.ensure_future(limited.services.worker.run(hold.wait))
    try:
        with depth_log(limited.services) as depths:
            first = asyncio.ensure_future(limited.infer("tiny-se", request))
            await wait_for(depths, 1, 0)
            second = asyncio.ensure_future(limited.infer("tiny-se", request))
            await wait_for(depths, 1)  # waiting in the queue, which is now full
        check_error(await limited.infer("tiny-se", request), 503, "full")
        for late in await asyncio.gather(first, second):
            check_error(late, 504, "1s")
    finally:
        hold.set()
        await blocker
