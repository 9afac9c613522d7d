"""The real server process: request IDs, JSON logs, and a SIGTERM under load that a load balancer
can follow (readiness 503 at once, still serving during the drain delay, nothing lost, exit 0)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serverproc import start_server, stop_server, wait_ready

pytestmark = pytest.mark.slow

DRAIN_DELAY_S = 4.0
CLIENTS = 8


@pytest.fixture
def server(model_repository: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    log = tmp_path / "server.log"
    url, process = start_server(
        model_repository,
        log,
        models="tiny-se",
        log_format="json",
        drain_delay_s=str(DRAIN_DELAY_S),
        cpu_threads="2",
    )
    try:
        wait_ready(url, process)
        yield url, process, log
    finally:
        stop_server(process)


def _log_lines(log: Path) -> list[dict]:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is one JSON object


async def _request_ids(client: httpx.AsyncClient, png: bytes) -> None:
    url = "/v1/models/tiny-se/predict"
    png_type = {"content-type": "image/png"}
    given = await client.post(url, content=png, headers={**png_type, "x-request-id": "abc-123"})
    assert given.status_code == 200 and given.headers["x-request-id"] == "abc-123"
    for bad in ("has spaces", "x" * 200, "semi;colon"):
        answer = await client.post(url, content=png, headers={**png_type, "x-request-id": bad})
        fresh = answer.headers["x-request-id"]
        assert answer.status_code == 200 and fresh != bad and len(fresh) == 32
    bad_image = {"content-type": "image/png", "x-request-id": "err-1"}
    error = await client.post(url, content=b"not an image", headers=bad_image)
    assert error.status_code == 400 and error.headers["x-request-id"] == "err-1"
    assert error.json()["request_id"] == "err-1"
    v2 = await client.post("/v2/models/nope/infer", json={}, headers={"x-request-id": "v2-err"})
    assert v2.status_code == 404 and v2.headers["x-request-id"] == "v2-err"


async def test_request_ids_json_logs_and_sigterm_under_load(
    server: tuple[str, subprocess.Popen, Path], digits: list
) -> None:
    url, process, log = server
    png = digits[0][1]
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await _request_ids(client, png)

        statuses: list[int] = []
        sending = True

        async def client_loop() -> None:
            # A new connection per request, as a load balancer's new requests arrive.
            while sending:
                async with httpx.AsyncClient(base_url=url, timeout=30) as own:
                    answer = await own.post(
                        "/v1/models/tiny-se/predict",
                        content=png,
                        headers={"content-type": "image/png"},
                    )
                    statuses.append(answer.status_code)

        loops = [asyncio.create_task(client_loop()) for _ in range(CLIENTS)]
        await asyncio.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        ready = None
        while time.monotonic() - signalled < 2.0:
            ready = await client.get("/health/ready")
            if ready.status_code == 503:
                break
            await asyncio.sleep(0.05)
        assert ready is not None and ready.status_code == 503, ready and ready.text
        assert ready.json()["error"] == "shutting_down"
        during = len(statuses)
        # Keep sending until shortly before the delay ends, as traffic does until the balancer
        # has seen the 503.
        await asyncio.sleep(max(0.0, DRAIN_DELAY_S - 1.5 - (time.monotonic() - signalled)))
        sending = False
        await asyncio.gather(*loops)
        assert len(statuses) > during, "no request was served during the drain delay"
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert await asyncio.to_thread(process.wait, 60) == 0
    stopped_after = time.monotonic() - signalled
    assert stopped_after >= DRAIN_DELAY_S - 0.5  # the port stayed open through the delay

    lines = _log_lines(log)
    access = [line for line in lines if line["logger"] == "attnserve.access"]
    tagged = [line for line in access if line["request_id"] == "abc-123"]
    assert len(tagged) == 1
    entry = tagged[0]
    assert entry["route"] == "/v1/models/{name}/predict" and entry["model"] == "tiny-se"
    assert entry["status"] == 200 and entry["batch_size"] >= 1 and entry["bytes"] > 0
    assert entry["latency_ms"] >= entry["queue_ms"] >= 0
    assert len(access) >= len(statuses) + 5
    messages = " ".join(line["message"] for line in lines)
    assert "draining" in messages and "attnserve stopped" in messages
