"""A real server process serving three shipped zoo models (one with a genuine spatial gate,
one with a context mask, one without attention), shared by the viewer, CLI and client tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.settings import default_model_repository

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
ZOO_MODELS = ("digits-cbam", "digits-gc", "digits-none")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def zoo_env() -> dict[str, str]:
    """ATTNSERVE_* settings of the zoo subset (for the server and for in-process runs)."""
    return {
        "ATTNSERVE_MODEL_REPOSITORY": str(default_model_repository()),
        "ATTNSERVE_MODELS": ",".join(ZOO_MODELS),
        "ATTNSERVE_CPU_THREADS": "2",
    }


@contextlib.contextmanager
def running_server(env_settings: dict[str, str], folder: Path) -> Iterator[str]:
    """`python -m service serve` with these ATTNSERVE_* settings on a free loopback port (its
    log in `folder`); its base URL once ready; stopped on exit."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNSERVE_")} | env_settings
    log_path = folder / "server.log"
    command = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited during start-up:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after 120 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="session")
def zoo_server(zoo_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m service serve` on a free loopback port; its base URL once ready."""
    with running_server(zoo_env, tmp_path_factory.mktemp("server")) as url:
        yield url


@pytest.fixture(scope="session")
def digit_box() -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the digit's 28x28 placement box in examples/digit-7.png, found by
    matching the example against the held-out canvases it was taken from."""
    from models.training.data import heldout_canvases

    example = np.asarray(Image.open(EXAMPLES / "digit-7.png"))
    canvases = heldout_canvases()
    for image, box in zip(canvases.images, canvases.boxes, strict=True):
        if np.array_equal(image, example):
            return tuple(int(v) for v in box)  # type: ignore[return-value]
    pytest.fail("examples/digit-7.png is not one of the held-out canvases")
