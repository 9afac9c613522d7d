"""A model's own precision: the `autocast` parameter of its config.json overrides
ATTNSERVE_AUTOCAST for that model only, on a real app with real packages; a CPU without native
bf16 refuses it for that model, which fails with the reason in the log."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess import Served, serve
from PIL import Image

from models import ModelCard, load_package, save_package
from models.training.data import heldout_canvases
from service.imaging import preprocess
from service.model_config import config_from_json
from service.runner import cpu_has_bf16
from service.settings import Settings

pytestmark = pytest.mark.slow
needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16")
ZOO_SE = Path(__file__).resolve().parents[2] / "models" / "zoo" / "digits-se"


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    """Held-out digit canvases (never trained on), preprocessed for the shipped SE model."""
    config = load_package(ZOO_SE)[0].data_config
    images = heldout_canvases().subset(8).images
    return torch.stack([preprocess(Image.fromarray(i), config).tensor for i in images]).numpy()


def repository(root: Path, autocast: dict[str, str | None]) -> Path:
    """The shipped SE model under each name; config.json sets `autocast` where given."""
    model = load_package(ZOO_SE)[0]
    for name, value in autocast.items():
        save_package(model, ModelCard.from_model(model, name), root / name)
        if value is not None:
            config = {"parameters": {"autocast": {"string_value": value}}}
            (root / name / "config.json").write_text(json.dumps(config))
    return root


async def probabilities(served: Served, name: str, batch: np.ndarray) -> np.ndarray:
    request = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(batch.shape),
                    "data": batch.ravel().tolist()}],
        "outputs": [{"name": "probabilities"}],
    }  # fmt: skip
    response = await served.infer(name, request)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    return np.array(output["data"]).reshape(output["shape"])


async def autocast_in_effect(served: Served, name: str) -> str:
    config = (await served.client.get(f"/v2/models/{name}/config")).json()
    return str(config["parameters"]["autocast"]["string_value"])


def test_the_parameter_is_read_and_checked() -> None:
    parameters = {"autocast": {"string_value": "bf16"}, "arch": {"string_value": "resnet50"}}
    assert config_from_json(json.dumps({"parameters": parameters}), "m").autocast == "bf16"
    assert config_from_json("{}", "m").autocast is None
    for parameters, message in (
        ({"autocast": {"string_value": "int8"}}, "parameters.autocast must be"),
        ({"autocast": "bf16"}, "parameters.autocast must be"),
        ({"precision": {"string_value": "bf16"}}, "unknown key"),
    ):
        with pytest.raises(ValueError, match=message):
            config_from_json(json.dumps({"parameters": parameters}), "m")


@needs_bf16
@pytest.mark.parametrize("server_wide", ["none", "bf16"])
async def test_each_model_runs_at_its_own_precision(
    tmp_path: Path, server_wide: str, batch: np.ndarray
) -> None:
    """The shipped SE model three times: config bf16, config none, and no config (the
    server-wide setting). Models at the same precision answer the same; bf16 moves the
    probabilities slightly and keeps the top-1 on real digits."""
    root = repository(tmp_path, {"bf": "bf16", "fp": "none", "default": None})
    async with serve(Settings(model_repository=root, autocast=server_wide)) as served:
        bf, fp, default = [await probabilities(served, n, batch) for n in ("bf", "fp", "default")]
        effect = [await autocast_in_effect(served, n) for n in ("bf", "fp", "default")]
    assert effect == ["bf16", "none", server_wide]
    same_as_default = bf if server_wide == "bf16" else fp
    np.testing.assert_allclose(default, same_as_default, atol=1e-6)
    assert 1e-6 < np.abs(bf - fp).max() < 0.05
    np.testing.assert_array_equal(bf.argmax(1), fp.argmax(1))


async def test_bf16_is_refused_for_the_model_on_a_cpu_without_native_bf16(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    batch: np.ndarray,
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    root = repository(tmp_path, {"bf": "bf16", "fp": None})
    with caplog.at_level(logging.ERROR, logger="service.hosting"):
        async with serve(Settings(model_repository=root)) as served:
            assert served.services.registry.get("bf").status == "failed"
            ready = await served.client.get("/v2/models/bf/ready")
            assert ready.status_code == 503
            assert (await probabilities(served, "fp", batch)).shape == (len(batch), 10)
    assert "autocast 'bf16' on the CPU needs native bf16 support" in caplog.text
