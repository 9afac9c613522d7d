"""Connection limits against the real server process: slow clients are closed within the
configured timeouts while normal requests keep being answered; malformed HTTP, oversized heads
and connections past the cap get JSON errors. Timings are bounds with generous margins."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serverproc import start_server, stop_server, wait_ready

pytestmark = pytest.mark.slow

TIMEOUT_S = 2.0  # header and body timeouts of the test server
MARGIN_S = 10.0  # closed within the timeout plus this, whatever the machine's load
SLOW_CONNECTIONS = 100


@pytest.fixture(scope="module")
def server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    log = tmp_path_factory.mktemp("connections") / "server.log"
    url, process = start_server(
        model_repository,
        log,
        models="tiny-se",
        cpu_threads="1",
        grpc_port="0",  # no gRPC listener: several servers run at once
        header_timeout_s=str(TIMEOUT_S),
        body_timeout_s=str(TIMEOUT_S),
        keep_alive_timeout_s=str(TIMEOUT_S),
        max_header_count="50",
        max_header_bytes="8192",
        max_connections="400",
    )
    try:
        wait_ready(url, process, log=log)
        yield url, process
    finally:
        stop_server(process)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def exchange(url: str, data: bytes) -> tuple[int, dict]:
    """Send raw bytes, read until the server closes; the status and JSON body of the answer,
    which must carry its request ID in the X-Request-ID header and (but on /v2, whose error
    object is {"error"} alone) in the body."""
    with socket.create_connection(address(url), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer[:300]
    decoded = json.loads(body)
    lines = head.decode("latin-1").split("\r\n")
    (request_id,) = [
        v.strip() for k, _, v in (x.partition(":") for x in lines) if k.lower() == "x-request-id"
    ]
    assert request_id and decoded.get("request_id", request_id) == request_id, head
    return int(head.split(b" ", 2)[1]), decoded


async def slow_client(url: str, kind: str, image: bytes) -> tuple[str, float, bytes]:
    """One slow connection of `kind`; (kind, seconds until the server closed it, its answer)."""
    reader, writer = await asyncio.open_connection(*address(url))
    opened = time.monotonic()
    head = (
        b"POST /v1/models/tiny-se/predict HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(image)
    )

    async def feed() -> None:
        if kind == "headers":  # the head one byte every half second, never finished
            for byte in head[:-4]:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.5)
        elif kind == "body":  # the whole head, part of the body, then nothing
            writer.write(head + image[:100])

    feeder = asyncio.create_task(feed())
    try:
        async with asyncio.timeout(TIMEOUT_S + MARGIN_S):
            answer = await reader.read()  # until the server closes the connection
        return kind, time.monotonic() - opened, answer
    finally:
        feeder.cancel()
        writer.close()


async def test_slow_clients_are_closed_while_others_are_served(
    server: tuple[str, subprocess.Popen[bytes]], digits: list
) -> None:
    url, process = server
    image = digits[0][1]
    kinds = ["nothing", "headers", "body"]
    slow = [
        asyncio.create_task(slow_client(url, kinds[i % 3], image)) for i in range(SLOW_CONNECTIONS)
    ]
    answered = 0
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not all(task.done() for task in slow) or answered < 5:
            response = await client.post(
                "/v1/models/tiny-se/predict", content=image, headers={"content-type": "image/png"}
            )
            assert response.status_code == 200, response.text
            answered += 1
            await asyncio.sleep(0.2)
    results = [task.result() for task in slow]  # a TimeoutError here: a connection stayed open
    assert process.poll() is None
    for kind, seconds, answer in results:
        assert seconds <= TIMEOUT_S + MARGIN_S
        if kind == "nothing":
            assert answer == b""  # closed quietly
        else:
            assert answer.startswith(b"HTTP/1.1 408 "), (kind, answer[:200])
            body = json.loads(answer.partition(b"\r\n\r\n")[2])
            assert body["error"] == "request_timeout", body
    assert answered >= 5


def test_idle_keep_alive_connection_is_closed(server: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = server
    with socket.create_connection(address(url), timeout=TIMEOUT_S + MARGIN_S) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # the answer, then the close after the idle time
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/models HTTP/1.1\r\nHost: test\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/models HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nabc",
        b"GET /health/live HTTP/1.1\r\nHost: test\r\nBad Header: x\r\n\r\n",
    ],
    ids=["request-line", "content-length", "length-and-chunked", "header-name"],
)
def test_malformed_http_gets_json_400(
    server: tuple[str, subprocess.Popen[bytes]], request_bytes: bytes
) -> None:
    status, body = exchange(server[0], request_bytes)
    assert status == 400
    assert body["error"] == "bad_request" and "malformed HTTP" in body["detail"]


def test_a_refused_head_echoes_the_clients_request_id(
    server: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """A head refused after its X-Request-ID was read answers with that ID."""
    data = b"GET /health/live HTTP/1.1\r\nHost: test\r\nX-Request-ID: trace-42\r\n"
    many = b"".join(b"X-%d: v\r\n" % i for i in range(60))
    status, body = exchange(server[0], data + many + b"\r\n")
    assert status == 431
    assert body["request_id"] == "trace-42"


@pytest.mark.parametrize(
    ("headers", "unfinished"),
    [
        (b"X-Big: " + b"a" * 20_000 + b"\r\n", False),  # one header past the size
        (b"".join(b"X-%d: v\r\n" % i for i in range(60)), False),  # more headers than allowed
        (b"X-Big: " + b"a" * 100_000, True),  # a header line that never ends
    ],
    ids=["size", "count", "unfinished-line"],
)
def test_oversized_heads_get_json_431(
    server: tuple[str, subprocess.Popen[bytes]], headers: bytes, unfinished: bool
) -> None:
    url, process = server
    data = b"GET /health/live HTTP/1.1\r\nHost: test\r\n" + headers
    status, body = exchange(url, data if unfinished else data + b"\r\n")
    assert status == 431
    assert body["error"] == "headers_too_large"
    assert process.poll() is None


def test_connections_past_the_cap_get_json_503(model_repository: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    url, process = start_server(
        model_repository,
        log,
        models="tiny-se",
        cpu_threads="1",
        grpc_port="0",  # no gRPC listener: several servers run at once
        max_connections="4",
        header_timeout_s="120",
    )
    try:
        wait_ready(url, process, log=log)
        held = [socket.create_connection(address(url)) for _ in range(4)]
        try:
            time.sleep(0.5)
            for path in ("/health/live", "/v2/health/live"):
                request = f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()
                status, body = exchange(url, request)
                assert status == 503
                assert isinstance(body["error"], str)
                assert path.startswith("/v2") or body["request_id"]
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the held connections' close reaches the server
            if httpx.get(f"{url}/health/live", timeout=10).status_code == 200:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("still refused after the held connections closed")
    finally:
        stop_server(process)
