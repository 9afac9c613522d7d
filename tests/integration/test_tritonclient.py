"""The real `tritonclient` (HTTP and gRPC) against a real server process in explicit model
control mode: metadata, inference equal to /v1, classification, attention outputs, a batched
gRPC stream, model config, statistics, the repository index, load and unload, gRPC errors.
"""

from __future__ import annotations

import json
import queue
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from serverproc import free_port, start_server, stop_server, wait_ready
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.slow

SETTINGS = {
    "model_control_mode": "explicit",
    "models": "tiny-se,tiny-cbam",
    "max_batch_delay_ms": "50",
    "max_body_bytes": str(256 * 1024),
    "cpu_threads": "2",
}


@pytest.fixture(scope="module")
def server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """(HTTP url, gRPC address) of one server process for the module."""
    grpc_port = free_port()
    log = tmp_path_factory.mktemp("triton") / "server.log"
    url, process = start_server(model_repository, log, grpc_port=str(grpc_port), **SETTINGS)
    try:
        wait_ready(url, process)
        yield url, f"127.0.0.1:{grpc_port}"
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def http(server: tuple[str, str]) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server[0].removeprefix("http://"))


@pytest.fixture(scope="module")
def grpc_client(server: tuple[str, str]) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server[1])


def image_input(module: Any, images: list[bytes]) -> Any:
    tensor = module.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def v1_probabilities(url: str, model: str, image: bytes) -> np.ndarray:
    """Class probabilities from /v1 (rounded there to 5 decimals), in class-index order."""
    request = urllib.request.Request(
        f"{url}/v1/models/{model}/predict?top_k=10&maps=none",
        data=image,
        headers={"Content-Type": "image/png"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        predictions = json.load(response)["results"][0]["predictions"]
    probs = np.zeros(len(predictions))
    for entry in predictions:
        probs[entry["index"]] = entry["probability"]
    return probs


def stats(client: grpcclient.InferenceServerClient, model: str) -> dict[str, int]:
    entry = client.get_inference_statistics(model, "1", as_json=True)["model_stats"][0]
    inference = entry["inference_stats"]
    return {
        "inference": int(entry.get("inference_count", 0)),
        "execution": int(entry.get("execution_count", 0)),
        "success": int(inference["success"].get("count", 0)),
        "queue": int(inference["queue"].get("count", 0)),
    }


def test_metadata_and_readiness(http, grpc_client) -> None:
    for client in (http, grpc_client):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("tiny-se") and client.is_model_ready("tiny-se", "1")
        assert not client.is_model_ready("tiny-gc")  # in the repository, not loaded
    assert {"model_repository", "statistics", "model_configuration"} <= set(
        grpc_client.get_server_metadata(as_json=True)["extensions"]
    )
    meta = grpc_client.get_model_metadata("tiny-cbam", as_json=True)
    assert meta["versions"] == ["1"]
    assert [i["name"] for i in meta["inputs"]] == ["image", "input"]
    names = [o["name"] for o in meta["outputs"]]
    assert names[:2] == ["probabilities", "attention_summary"]
    assert names == [o["name"] for o in http.get_model_metadata("tiny-cbam")["outputs"]]


def test_infer_http_binary_and_grpc_equal_v1(server, http, grpc_client, digits) -> None:
    image = digits[5][1]
    expected = v1_probabilities(server[0], "tiny-se", image)
    by_http = http.infer(
        "tiny-se",
        [image_input(httpclient, [image])],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=True)],
    )
    by_grpc = grpc_client.infer("tiny-se", [image_input(grpcclient, [image])])
    for result in (by_http, by_grpc):
        probs = result.as_numpy("probabilities")
        assert probs.shape == (1, 10) and probs.dtype == np.float32
        np.testing.assert_allclose(probs[0], expected, atol=1e-5)
    assert by_grpc.as_numpy("attention_summary").shape[0] == 1
    assert by_grpc.get_response().model_version == "1"


def test_classification(http, grpc_client, digits) -> None:
    image = digits[2][1]
    probs = grpc_client.infer("tiny-cbam", [image_input(grpcclient, [image])]).as_numpy(
        "probabilities"
    )[0]
    top3 = list(np.argsort(-probs, kind="stable")[:3])
    for module, client in ((httpclient, http), (grpcclient, grpc_client)):
        result = client.infer(
            "tiny-cbam",
            [image_input(module, [image])],
            outputs=[module.InferRequestedOutput("probabilities", class_count=3)],
        )
        strings = [s.decode() for s in result.as_numpy("probabilities")[0]]
        assert [int(s.split(":")[1]) for s in strings] == top3
        assert float(strings[0].split(":")[0]) == pytest.approx(probs[top3[0]], abs=1e-6)


def test_attention_outputs(http, grpc_client, digits) -> None:
    meta = grpc_client.get_model_metadata("tiny-cbam", as_json=True)
    spatial = next(o for o in meta["outputs"] if o["name"].endswith("/spatial"))
    channel = next(o for o in meta["outputs"] if o["name"].endswith("/channel"))
    images = [digits[0][1], digits[1][1]]
    arrays = []
    for module, client in ((grpcclient, grpc_client), (httpclient, http)):
        outputs = [module.InferRequestedOutput(spatial["name"])]
        outputs.append(module.InferRequestedOutput(channel["name"]))
        result = client.infer("tiny-cbam", [image_input(module, images)], outputs=outputs)
        maps, gates = result.as_numpy(spatial["name"]), result.as_numpy(channel["name"])
        assert maps.ndim == len(spatial["shape"]) and maps.shape[0] == 2
        assert gates.ndim == 2 and ((gates > 0) & (gates < 1)).all()  # sigmoid gates
        arrays.append(maps)
    np.testing.assert_allclose(arrays[0], arrays[1], atol=1e-6)


def test_grpc_stream_is_batched(grpc_client, digits) -> None:
    """Sixteen requests on one stream run concurrently and share batches."""
    before = stats(grpc_client, "tiny-se")
    answers: queue.Queue[Any] = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(16):
            inputs = [image_input(grpcclient, [digits[i][1]])]
            grpc_client.async_stream_infer("tiny-se", inputs, request_id=str(i))
        received = [answers.get(timeout=120) for _ in range(16)]
    finally:
        grpc_client.stop_stream()
    assert all(error is None for _, error in received)
    ids = sorted(int(result.get_response().id) for result, _ in received)
    assert ids == list(range(16))
    after = stats(grpc_client, "tiny-se")
    assert after["inference"] - before["inference"] == 16
    assert after["execution"] - before["execution"] < 16  # at least one batch held several


def test_model_config(http, grpc_client) -> None:
    config = grpc_client.get_model_config("tiny-cbam", as_json=True)["config"]
    assert config["name"] == "tiny-cbam" and config["backend"] == "attnserve"
    assert int(config["max_batch_size"]) == 32
    assert [i["name"] for i in config["input"]] == ["image", "input"]
    assert any(o["name"].startswith("attention/") for o in config["output"])
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 50_000
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert http.get_model_config("tiny-cbam")["max_batch_size"] == 32


def test_statistics_count_the_requests(http, grpc_client, digits) -> None:
    before = stats(grpc_client, "tiny-cbam")
    for i in range(3):
        grpc_client.infer("tiny-cbam", [image_input(grpcclient, [digits[i][1]])])
    http.infer("tiny-cbam", [image_input(httpclient, [digits[3][1], digits[4][1]])])
    after = stats(grpc_client, "tiny-cbam")
    assert after["success"] - before["success"] == 4  # requests
    assert after["inference"] - before["inference"] == 5  # images
    assert after["queue"] - before["queue"] == 5
    assert 1 <= after["execution"] - before["execution"] <= 5
    http_stats = http.get_inference_statistics("tiny-cbam")["model_stats"][0]
    assert http_stats["inference_count"] == after["inference"]


def test_repository_index_load_and_unload(http, grpc_client, digits) -> None:
    index = {(m["name"], m.get("version")): m for m in http.get_model_repository_index()}
    assert index[("tiny-se", "1")]["state"] == "READY"
    assert index[("tiny-gc", "1")]["state"] == "UNAVAILABLE"
    override = json.dumps({"max_batch_size": 4, "dynamic_batching": {}})
    grpc_client.load_model("tiny-gc", config=override)
    assert http.is_model_ready("tiny-gc")
    assert grpc_client.get_model_config("tiny-gc", as_json=True)["config"]["max_batch_size"] == 4
    result = http.infer("tiny-gc", [image_input(httpclient, [digits[0][1]])])
    assert result.as_numpy("probabilities").shape == (1, 10)
    http.unload_model("tiny-gc")
    with pytest.raises(InferenceServerException) as refused:
        grpc_client.infer("tiny-gc", [image_input(grpcclient, [digits[0][1]])])
    assert refused.value.status() == "StatusCode.NOT_FOUND"
    states = {m.name: m.state for m in grpc_client.get_model_repository_index().models}
    assert states["tiny-gc"] == "UNAVAILABLE" and states["tiny-se"] == "READY"
    with pytest.raises(InferenceServerException, match="no model 'nope' in the repository"):
        http.load_model("nope")


def raw_call(address: str, request: Any, method: str = "ModelInfer") -> grpc.RpcError:
    """Call the service with the generated stub and return the error it answers with."""
    from tritonclient.grpc import service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            getattr(stub, method)(request, timeout=60)
    return caught.value


def infer_request(model: str, shape: list[int], raw: bytes, name: str = "input") -> Any:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=shape)
    request.raw_input_contents.append(raw)
    return request


def test_grpc_errors(server, grpc_client) -> None:
    address = server[1]
    unknown = raw_call(address, infer_request("nope", [1, 1, 64, 64], bytes(4 * 64 * 64)))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    bad_shape = raw_call(address, infer_request("tiny-se", [1, 1, 32, 32], bytes(4 * 32 * 32)))
    assert bad_shape.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shape" in bad_shape.details()
    too_big = raw_call(address, infer_request("tiny-se", [20, 1, 64, 64], bytes(20 * 4 * 4096)))
    assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # 320 KiB > max_body_bytes
    # a queue of one: the second image of a three-image request finds it full
    grpc_client.load_model(
        "tiny-gc",
        config=json.dumps({"dynamic_batching": {"default_queue_policy": {"max_queue_size": 1}}}),
    )
    try:
        full = raw_call(address, infer_request("tiny-gc", [3, 3, 64, 64], bytes(3 * 4 * 3 * 4096)))
    finally:
        grpc_client.unload_model("tiny-gc")
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(full.trailing_metadata() or ())
    assert int(trailers["retry-after"]) >= 1 and "grpc-retry-pushback-ms" in trailers


def test_grpc_health(server) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server[1]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
