"""deploy/ray on a real local Ray cluster: two replicas behind Ray Serve's HTTP proxy.

`serve run` starts the cluster on 127.0.0.1 from a copy of deploy/ray/serve_config.yaml that
differs only where this machine differs from a GPU node (a free port, the test's repository,
CPU, fractional CPUs per replica, at most two replicas). The answers must equal the plain app's,
both replicas must answer, and after one replica's actor process is killed the requests must
still be answered while Ray brings a new replica up. Skipped when the ray extra is missing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("ray.serve", reason="Ray Serve is the ray extra: pip install -e '.[ray]'")

ROOT = Path(__file__).resolve().parents[2]
RAY_APP = ROOT / "deploy" / "ray"
HEADER = "x-attnserve-replica"
MODEL = "deploy-probe"
STARTUP_S = 120.0
RECOVERY_S = 60.0

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _settings(repository: Path) -> dict[str, Any]:
    """The replicas' settings on this 2-core machine: one single-threaded device instance."""
    return {
        "model_repository": str(repository),
        "device": "cpu",
        "cpu_threads": 1,
        "instances": 1,
        "max_batch_size": 4,
    }


def _config(port: int, repository: Path) -> dict[str, Any]:
    config = yaml.safe_load((RAY_APP / "serve_config.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    app["args"]["settings"].update(_settings(repository))
    (deployment,) = app["deployments"]
    deployment["autoscaling_config"].update(min_replicas=2, max_replicas=2)
    deployment["ray_actor_options"] = {"num_cpus": 0.5, "num_gpus": 0}
    deployment["health_check_period_s"] = 2
    return config


def _post(base: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        f"{base}/v1/models/{MODEL}/predict",
        data=body,
        headers={"content-type": "image/png"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health/ready", timeout=5) as answer:
            return answer.status == 200
    except OSError:
        return False


def _replica(headers: dict[str, str]) -> tuple[str, int]:
    value = {k.lower(): v for k, v in headers.items()}[HEADER]
    replica, pid = value.split()
    return replica, int(pid)


@pytest.fixture
def ray_serve(model_repository: Path, tmp_path: Path) -> Iterator[str]:
    """`serve run` of the test's config; yields the proxy's base URL once both replicas answer."""
    port = _free_port()
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(_config(port, model_repository)))
    # Unix socket paths must stay short, so Ray's session directory is not under tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(RAY_APP), str(ROOT)]),
        "RAY_TMPDIR": ray_tmp,
        # Ray takes the loopback address for the node (no other interface is used).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    }
    env = {k: v for k, v in env.items() if not k.startswith("ATTNSERVE_")}
    log = (tmp_path / "serve.log").open("wb")
    serve = Path(sys.executable).with_name("serve")
    process = subprocess.Popen(
        [str(serve), "run", str(config)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while not _ready(base):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (tmp_path / "serve.log").read_text(errors="replace")[-4000:]
                pytest.fail(f"Ray Serve did not become ready:\n{tail}")
            time.sleep(0.5)
        yield base
    finally:
        # serve run shuts Serve down on SIGINT and its exit stops the cluster it started.
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


async def _plain_answer(repository: Path, body: bytes) -> dict[str, Any]:
    """The same request answered by the plain app (in-process) with the same settings."""
    import httpx

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(**_settings(repository)))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://attnserve") as client:
            async with asyncio.timeout(60):
                while (await client.get("/health/ready")).status_code != 200:
                    await asyncio.sleep(0.2)
            answer = await client.post(
                f"/v1/models/{MODEL}/predict", content=body, headers={"content-type": "image/png"}
            )
            assert answer.status_code == 200, answer.text
            return answer.json()


def test_two_replicas_answer_like_the_plain_server_and_survive_a_killed_replica(
    ray_serve: str, model_repository: Path, coins_png: bytes
) -> None:
    import json

    base = ray_serve
    expected = asyncio.run(_plain_answer(model_repository, coins_png))

    # Bounded concurrent requests until both replicas have answered.
    seen: dict[str, int] = {}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(10):
            for status, headers, body in pool.map(lambda _: _post(base, coins_png), range(8)):
                assert status == 200, body[:500]
                assert json.loads(body) == expected
                replica, pid = _replica(headers)
                seen[replica] = pid
            if len(seen) == 2:
                break
    assert len(seen) == 2, f"replicas that answered: {seen}"

    # Kill one replica's actor process; the other keeps answering and Ray starts a new one.
    victim, pid = next(iter(seen.items()))
    os.kill(pid, signal.SIGKILL)
    answered, failed, replicas = 0, 0, set()
    deadline = time.monotonic() + RECOVERY_S
    while time.monotonic() < deadline:
        status, headers, body = _post(base, coins_png)
        if status == 200:
            answered += 1
            assert json.loads(body) == expected
            replicas.add(_replica(headers)[0])
        else:
            failed += 1
        if len(replicas - {victim}) == 2 and answered >= 20:
            break
        time.sleep(0.05)
    print(f"after the kill: {answered} answered, {failed} failed, replicas {sorted(replicas)}")
    assert victim not in replicas
    assert len(replicas - {victim}) == 2, f"no new replica within {RECOVERY_S} s: {replicas}"
    assert failed <= 1, f"{failed} requests failed after the kill ({answered} answered)"
