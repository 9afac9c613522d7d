"""API keys against the real server process: 401 without a valid key, 403 for an inference key
on a management route, health open, /metrics protected by its setting, no key in the log, and a
malformed keys file stopping start-up with the bad line named."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serverproc import server_env, start_server, stop_server, wait_ready

pytestmark = pytest.mark.slow

INFER_KEY = "infer-key-9f8e7d6c5b4a"
ADMIN_KEY = "admin-key-0a1b2c3d4e5f"


def keys_file(path: Path) -> Path:
    path.write_text(
        "# attnserve API keys\n\n"
        f"{hashlib.sha256(INFER_KEY.encode()).hexdigest()}\n"
        f"{hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}   admin\n"
    )
    return path


@pytest.fixture(scope="module")
def server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    root = tmp_path_factory.mktemp("auth")
    log = root / "server.log"
    url, process = start_server(
        model_repository,
        log,
        models="tiny-se",
        cpu_threads="1",
        grpc_port="0",  # no gRPC listener: several servers run at once
        log_level="trace",  # the most the server ever logs: still no key
        api_keys_file=str(keys_file(root / "keys")),
        auth_protect_metrics="true",
    )
    try:
        wait_ready(url, process, log=log)
        yield url, log, process
    finally:
        stop_server(process)


def predict(client: httpx.Client, image: bytes, **headers: str) -> httpx.Response:
    return client.post(
        "/v1/models/tiny-se/predict",
        content=image,
        headers={"content-type": "image/png", **headers},
    )


def test_keys_and_scopes(server: tuple[str, Path, subprocess.Popen[bytes]], digits: list) -> None:
    url, log, process = server
    image = digits[0][1]
    bearer = {"authorization": f"Bearer {INFER_KEY}"}
    with httpx.Client(base_url=url, timeout=30) as client:
        # No key, a wrong key, a key in the wrong header form: 401 with the JSON error body.
        for headers in ({}, {"authorization": "Bearer not-a-key"}, {"x-api-key": INFER_KEY + "x"}):
            response = predict(client, image, **headers)
            assert response.status_code == 401, response.text
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"] == "unauthorized"
        response = client.post("/v1/models/tiny-se/predict", content=image, auth=(INFER_KEY, ""))
        assert response.status_code == 401  # Basic is not a way to send a key
        # /v2 answers in the Open Inference Protocol's error shape.
        response = client.get("/v2/models/tiny-se")
        assert response.status_code == 401
        assert set(response.json()) >= {"error"} and isinstance(response.json()["error"], str)

        # The right key, in either header, and an admin key: 200.
        for headers in (bearer, {"x-api-key": INFER_KEY}, {"authorization": f"bearer {ADMIN_KEY}"}):
            response = predict(client, image, **headers)
            assert response.status_code == 200, response.text
            assert response.json()["results"][0]["predictions"]
        assert client.get("/v2/models/tiny-se", headers=bearer).status_code == 200

        # Management needs the admin scope.
        response = client.post("/v2/repository/index", json={}, headers=bearer)
        assert response.status_code == 403, response.text
        assert "error" in response.json()
        admin = client.post("/v2/repository/index", json={}, headers={"x-api-key": ADMIN_KEY})
        assert admin.status_code == 200, admin.text
        assert "tiny-se" in {entry["name"] for entry in admin.json()}
        response = client.post("/v2/repository/models/tiny-se/unload", headers=bearer)
        assert response.status_code == 403

        # Probes stay open; /metrics is protected by its setting, /openapi.json is not.
        for path in ("/health/live", "/health/ready", "/v2/health/ready"):
            assert client.get(path).status_code == 200, path
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer).status_code == 200
        assert client.get("/openapi.json").status_code == 200
    assert process.poll() is None
    text = log.read_text(errors="replace")
    assert "/v1/models/tiny-se/predict" in text  # the log did capture these requests
    for key in (INFER_KEY, ADMIN_KEY):
        assert key not in text


def test_malformed_keys_file_stops_start_up(model_repository: Path, tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# keys\n{hashlib.sha256(b'k').hexdigest()}\n{'AB' * 32} infer\n")
    env = server_env(model_repository, models="tiny-se", api_keys_file=str(path))
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"API keys file {path} line 3" in done.stderr
    assert "lowercase SHA-256 hex digest" in done.stderr


def test_keys_new_prints_a_key_and_its_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service", "keys", "new", "--scope", "admin"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines())
    key, entry = lines["key"].strip(), lines["line"].strip()
    assert len(key) >= 40
    assert entry == f"{hashlib.sha256(key.encode()).hexdigest()} admin"
