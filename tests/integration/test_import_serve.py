"""An imported model served by the real server process answers a real photo with ImageNet labels
and attention maps that cover the photo.

The checkpoint is the official mbv2_ca layout with random weights (generated from its key layout;
the real file is not reachable here), so the test checks the answer's labels and map geometry,
not what the network recognises.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from serverproc import free_port, server_env

from models.data import imagenet_classes
from models.imports import import_source

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from import_fixtures import mbv2_ca_keys, random_state, write_checkpoint

pytestmark = pytest.mark.slow

PHOTO = Path(__file__).resolve().parents[2] / "examples" / "cat.jpg"  # 451 x 300


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("import-serve")
    source = write_checkpoint(root / "mbv2_ca.pth", random_state(mbv2_ca_keys()))
    import_source(source, root / "repository" / "mbv2-ca")
    port = free_port()
    env = server_env(root / "repository", cpu_threads="1", max_batch_size="4")
    log = (root / "server.log").open("wb")
    command = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (root / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready after 120 s"
            time.sleep(0.3)
        yield url
    finally:
        process.kill()
        process.wait(10)
        log.close()


def test_a_photo_gets_imagenet_labels_and_maps_over_the_whole_photo(server: str) -> None:
    response = httpx.post(
        f"{server}/v1/models/mbv2-ca/predict?top_k=5&maps=layers&map_size=64",
        content=PHOTO.read_bytes(),
        headers={"Content-Type": "image/jpeg"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["image"] == {"width": 451, "height": 300}
    names = imagenet_classes()
    predictions = result["predictions"]
    assert len(predictions) == 5
    assert all(p["label"] == names[p["index"]] for p in predictions)
    summary = np.array(result["attention"]["summary"]["data"])
    assert result["attention"]["summary"]["shape"] == [43, 64] == list(summary.shape)
    # The model saw the centre crop (shorter side 300 -> 256, crop 224: 262.5 source pixels
    # square): the columns outside it are exactly 0; inside, the map varies and reaches near 1
    # (1 is its maximum on the model's grid, sampled here at the cell centres).
    centres = (np.arange(64) + 0.5) * 451 / 64
    outside = np.abs(centres - 451 / 2) > 262.5 / 2 + 451 / 64
    inside = np.abs(centres - 451 / 2) < 262.5 / 2 - 451 / 64
    assert outside.sum() >= 16 and (summary[:, outside] == 0).all()
    crop = summary[:, inside]
    assert 0.5 < crop.max() <= 1.0 and crop.min() < crop.max()
    layers = result["attention"]["layers"]
    spatial = [m for m in layers if m["kind"] == "spatial"]
    assert [m["layer"] for m in spatial] == [f"blocks.{i}.attn" for i in range(1, 17)]
    assert all(m["block"] == "coordatt" and m["shape"] == [43, 64] for m in spatial)
