"""Model versions, config.json, model control (explicit and poll) and unloading under load, on
real apps with real packages (service.repository, service.model_config, service.control)."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess import Served, serve

from models import ModelCard, create_model, load_package, save_package
from service.model_config import ModelConfig, config_from_json
from service.settings import Settings

pytestmark = pytest.mark.slow


def package(directory: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = create_model("resnet_small", "cbam")
    save_package(model, ModelCard.from_model(model, "multi"), directory)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Packages of three versions with different weights, to copy into repositories."""
    root = tmp_path_factory.mktemp("versions")
    for version in (1, 2, 3):
        package(root / str(version), seed=10 + version)
    return root


def repository(root: Path, versions: Path, numbers: list[int], config: dict | None) -> Path:
    model = root / "multi"
    for number in numbers:
        shutil.copytree(versions / str(number), model / str(number))
    if config is not None:
        (model / "config.json").write_text(json.dumps(config))
    return root


def tensor_request(batch: np.ndarray) -> dict:
    return {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(batch.shape),
                "data": batch.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "probabilities"}],
    }


def expected(versions: Path, number: int, batch: np.ndarray) -> np.ndarray:
    model = load_package(versions / str(number))[0]
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(batch)), dim=1).numpy()


async def infer(served: Served, path: str, batch: np.ndarray) -> tuple[str, np.ndarray]:
    response = await served.client.post(path, json=tensor_request(batch))
    assert response.status_code == 200, response.text
    body = response.json()
    output = body["outputs"][0]
    return body["model_version"], np.array(output["data"]).reshape(output["shape"])


BATCH = np.random.default_rng(0).standard_normal((2, 1, 64, 64)).astype(np.float32)


def test_config_json() -> None:
    config = config_from_json(
        json.dumps(
            {
                "name": "m",
                "version_policy": {"specific": {"versions": [3, 1]}},
                "max_batch_size": 8,
                "dynamic_batching": {
                    "max_queue_delay_microseconds": 2000,
                    "default_queue_policy": {
                        "max_queue_size": 16,
                        "default_timeout_microseconds": "5000000",
                    },
                },
                "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
            }
        ),
        "m",
    )
    assert config == ModelConfig("specific", (1, 3), 8, 2.0, 16, 5.0, 2)
    assert config.select([1, 2, 3, 4]) == [3, 1]
    assert ModelConfig().select([1, 2, 7]) == [7]  # latest 1 by default
    assert config_from_json('{"version_policy": {"all": {}}}', "m").select([2, 1]) == [2, 1]
    for text, message in (
        ('{"max_batch_size": 0}', "max_batch_size must be an integer from 1"),
        ('{"max_batch_szie": 4}', "unknown key"),
        ('{"name": "other"}', "not the model's name"),
        ('{"version_policy": {"newest": {}}}', "version_policy"),
        ("[1", "not valid JSON"),
    ):
        with pytest.raises(ValueError, match=message):
            config_from_json(text, "m")


async def test_two_versions_each_with_its_own_weights(tmp_path: Path, versions: Path) -> None:
    root = repository(tmp_path, versions, [1, 2], {"version_policy": {"all": {}}})
    async with serve(Settings(model_repository=root, max_batch_size=4)) as served:
        for number in (1, 2):
            version, probs = await infer(served, f"/v2/models/multi/versions/{number}/infer", BATCH)
            assert version == str(number)
            np.testing.assert_allclose(probs, expected(versions, number, BATCH), atol=1e-5)
        version, _ = await infer(served, "/v2/models/multi/infer", BATCH)
        assert version == "2"  # the highest ready version by default
        meta = (await served.client.get("/v2/models/multi")).json()
        assert meta["versions"] == ["1", "2"]
        files = {"file": ("x.png", _png(), "image/png")}
        v1 = await served.client.post("/v1/models/multi/predict?version=1", files=files)
        assert v1.status_code == 200
        missing = await served.client.post("/v1/models/multi/predict?version=5", files=files)
        assert missing.status_code == 404


async def test_latest_one_serves_only_the_newest(tmp_path: Path, versions: Path) -> None:
    root = repository(tmp_path, versions, [1, 2], None)
    async with serve(Settings(model_repository=root)) as served:
        version, probs = await infer(served, "/v2/models/multi/infer", BATCH)
        assert version == "2"
        np.testing.assert_allclose(probs, expected(versions, 2, BATCH), atol=1e-5)
        old = await served.client.post(
            "/v2/models/multi/versions/1/infer", json=tensor_request(BATCH)
        )
        assert old.status_code == 404
        index = (await served.client.post("/v2/repository/index")).json()
        assert [(e["version"], e["state"]) for e in index] == [("1", "UNAVAILABLE"), ("2", "READY")]


async def wait_for(check, timeout: float = 120.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)


async def test_poll_mode_loads_new_versions_and_keeps_serving_past_a_broken_one(
    tmp_path: Path, versions: Path
) -> None:
    root = repository(tmp_path, versions, [1], None)
    settings = Settings(model_repository=root, model_control_mode="poll", repository_poll_s=0.5)
    async with serve(settings) as served:
        shutil.copytree(versions / "2", root / "multi" / "2")

        async def serves_two() -> bool:
            return (await infer(served, "/v2/models/multi/infer", BATCH))[0] == "2"

        await wait_for(serves_two)
        _, probs = await infer(served, "/v2/models/multi/infer", BATCH)
        np.testing.assert_allclose(probs, expected(versions, 2, BATCH), atol=1e-5)
        broken = root / "multi" / "3"
        shutil.copytree(versions / "3", broken)
        (broken / "model.safetensors").write_bytes(b"not a safetensors file")

        async def reported() -> bool:
            index = (await served.client.post("/v2/repository/index")).json()
            entry = next((e for e in index if e["version"] == "3"), None)
            return entry is not None and "failed" in entry["reason"]

        await wait_for(reported)
        index = (await served.client.post("/v2/repository/index")).json()
        assert next(e for e in index if e["version"] == "3")["state"] == "UNAVAILABLE"
        version, probs = await infer(served, "/v2/models/multi/infer", BATCH)
        assert version == "2"  # the broken version 3 left version 2 serving
        np.testing.assert_allclose(probs, expected(versions, 2, BATCH), atol=1e-5)
        ready = await served.client.get("/v2/models/multi/versions/3/ready")
        assert ready.status_code == 503 and "failed" in ready.json()["error"]


async def test_unload_under_load_loses_no_request(tmp_path: Path, versions: Path) -> None:
    """Requests admitted before the unload are all answered; one that comes while it drains
    gets 503, and one after it 404."""
    root = repository(tmp_path, versions, [1], None)
    settings = Settings(
        model_repository=root,
        model_control_mode="explicit",
        models=["multi"],
        max_batch_size=2,
        instances=1,
    )
    async with serve(settings) as served:
        post = served.client.post
        body = tensor_request(BATCH[:1])
        hosted = served.services.registry.get("multi")
        hold = threading.Event()
        blocker = asyncio.ensure_future(served.services.worker.run(hold.wait))
        try:
            burst = [
                asyncio.ensure_future(post("/v2/models/multi/infer", json=body)) for _ in range(24)
            ]

            async def all_admitted() -> bool:
                return hosted.in_flight == 24

            await wait_for(all_admitted)
            unload = asyncio.ensure_future(post("/v2/repository/models/multi/unload"))

            async def draining() -> bool:
                return hosted.status == "unloading"

            await wait_for(draining)
            late = await post("/v2/models/multi/infer", json=body)
            assert late.status_code == 503 and "unloading" in late.json()["error"]
        finally:
            hold.set()
        await blocker
        async with asyncio.timeout(120):  # none hangs
            answers = await asyncio.gather(*burst)
            assert (await unload).status_code == 200
        assert [a.status_code for a in answers] == [200] * 24
        assert all(a.json()["outputs"][0]["shape"] == [1, 10] for a in answers)
        assert hosted.status == "stopped" and hosted.batcher is None
        after = await post("/v2/models/multi/infer", json=body)
        assert after.status_code == 404
        reloaded = await post("/v2/repository/models/multi/load")
        assert reloaded.status_code == 200
        assert (await post("/v2/models/multi/infer", json=body)).status_code == 200


async def test_load_is_refused_outside_explicit_mode(tmp_path: Path, versions: Path) -> None:
    root = repository(tmp_path, versions, [1], None)
    async with serve(Settings(model_repository=root)) as served:
        refused = await served.client.post("/v2/repository/models/multi/unload")
        assert refused.status_code == 400 and "explicit" in refused.json()["error"]


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((28, 28), 200, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
