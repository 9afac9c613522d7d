"""The real server process: start-up, concurrent clients, batching, metrics, SIGTERM.

Answers computed inside dynamic batches must equal the answers for the same images sent alone.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from serverproc import free_port, server_env

pytestmark = pytest.mark.slow

CONCURRENT_CLIENTS = 16
REQUESTS = 64


@pytest.fixture
def server(model_repository: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m service serve` on a free port; killed if the test did not stop it."""
    port = free_port()
    env = server_env(
        model_repository,
        models="tiny-se,tiny-gc",
        max_batch_size="16",
        max_batch_delay_ms="10",
        cpu_threads="2",
    )
    log = (tmp_path / "server.log").open("wb")
    command = [sys.executable, "-m", "service", "serve", "--port", str(port), "--log-level", "info"]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()


async def wait_ready(client: httpx.AsyncClient, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "server exited during start-up"
        try:
            if (await client.get("/health/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"server not ready after {timeout}s")


def requests(photo_files: dict, digits: list) -> list[tuple[str, bytes, str]]:
    """Eight distinct (model, image, content type) requests of real photos and digits."""
    photos = [
        ("tiny-gc", photo_files[("coffee", "jpeg")], "image/jpeg"),
        ("tiny-gc", photo_files[("chelsea", "png")], "image/png"),
        ("tiny-se", photo_files[("china", "jpeg")], "image/jpeg"),
        ("tiny-se", photo_files[("astronaut", "jpeg")], "image/jpeg"),
    ]
    return photos + [("tiny-se", data, "image/png") for _, data in digits[:4]]


def vector(answer: dict) -> tuple[np.ndarray, np.ndarray]:
    result = answer["results"][0]
    probs = np.array([p["probability"] for p in result["predictions"]])
    return probs, np.array(result["attention"]["summary"]["data"])


async def ask(client: httpx.AsyncClient, model: str, data: bytes, kind: str) -> dict:
    response = await client.post(
        f"/v1/models/{model}/predict?top_k=10",
        content=data,
        headers={"content-type": kind},
    )
    assert response.status_code == 200, response.text
    return response.json()


def batch_counts(metrics: str) -> tuple[float, float]:
    """(observations of size 1, all observations) of attnserve_batch_size over the models."""
    ones = total = 0.0
    for line in metrics.splitlines():
        if line.startswith("attnserve_batch_size_bucket") and 'le="1.0"' in line:
            ones += float(line.rsplit(" ", 1)[1])
        elif line.startswith("attnserve_batch_size_count"):
            total += float(line.rsplit(" ", 1)[1])
    return ones, total


async def test_concurrent_clients_get_batched_answers_equal_to_single_ones(
    server: tuple[str, subprocess.Popen], photo_files: dict, digits: list
) -> None:
    url, process = server
    limits = httpx.Limits(max_connections=CONCURRENT_CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        await wait_ready(client, process, timeout=60)
        distinct = requests(photo_files, digits)
        alone = [await ask(client, *request) for request in distinct]
        gate = asyncio.Semaphore(CONCURRENT_CLIENTS)

        async def one(index: int) -> tuple[int, dict]:
            async with gate:
                return index % len(distinct), await ask(client, *distinct[index % len(distinct)])

        started = time.monotonic()
        async with asyncio.timeout(60):
            answers = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
        elapsed = time.monotonic() - started
        for index, answer in answers:
            expected = alone[index]
            assert [p["index"] for p in answer["results"][0]["predictions"]][:3] == [
                p["index"] for p in expected["results"][0]["predictions"]
            ][:3]
            probs, summary = vector(answer)
            want_probs, want_summary = vector(expected)
            np.testing.assert_allclose(probs, want_probs, atol=1e-4, rtol=0)
            # maps are rounded to 3 decimals: a 1e-6 difference can flip the last digit
            np.testing.assert_allclose(summary, want_summary, atol=1e-3 + 1e-9, rtol=0)
        metrics = (await client.get("/metrics")).text
        ones, total = batch_counts(metrics)
        assert total > ones, f"no batch larger than 1 in {total} batches"
        assert total < len(distinct) + REQUESTS
        print(f"{REQUESTS} requests in {elapsed:.2f}s, {int(total)} batches")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0


def test_invalid_setting_stops_the_cli(model_repository: Path) -> None:
    env = server_env(model_repository, max_batch_size="0")
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "max_batch_size" in done.stderr and "ATTNSERVE_MAX_BATCH_SIZE" in done.stderr
    assert "= '0'" in done.stderr and "greater than or equal to 1" in done.stderr
