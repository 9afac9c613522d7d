"""The container build and its deployment files, checked offline (no Docker engine needed).

Static checks: hadolint, the Dockerfile's final stage, the build context, the resolved Compose
model, the Prometheus and Grafana provisioning. Live checks: every metric the dashboard queries
exists in the app's /metrics, and the image's exact start command serves and drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from conftest import Dockerfile, DockerIgnore

ROOT = Path(__file__).resolve().parents[2]

DATASOURCE_UID = "attnserve-prometheus"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make ", "python3-dev", "pytest", "pip install")


def test_hadolint_reports_nothing(hadolint: Path) -> None:
    done = subprocess.run(
        [str(hadolint), "--no-color", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_base_images_are_pinned_and_variants_exist(dockerfile: Dockerfile) -> None:
    names = {s.name for s in dockerfile.stages}
    external = [s.base for s in dockerfile.stages if s.base not in names]
    assert external, "no external base image"
    for image in external:
        _, _, tag = image.rpartition(":")
        assert ":" in image and tag and tag != "latest", f"unpinned base image {image}"
    assert dockerfile.stage("base-gpu").base.startswith("nvidia/cuda:")
    assert dockerfile.stage("base-cpu").base.startswith("ubuntu:")
    assert dockerfile.global_args["VARIANT"] == "gpu"


def test_builder_installs_pinned_non_editable(dockerfile: Dockerfile) -> None:
    runs = " ".join(dockerfile.stage("builder").args("RUN"))
    assert "https://download.pytorch.org/whl/" in runs
    assert re.search(r"--constraint constraints\.txt torch\b", runs)
    assert re.search(r"PIP_CONSTRAINT=\S*constraints\.txt pip install \.", runs)
    assert " -e " not in runs and "--editable" not in runs


def test_final_stage_runs_unprivileged_from_a_venv(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    user = final.args("USER")[-1].split(":")[0]
    assert user not in ("0", "root")
    assert final.args("EXPOSE") == ["8000 8001"]
    copies = final.args("COPY")
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    runs = " ".join(r for stage in dockerfile.chain(final) for r in stage.args("RUN"))
    assert not [tool for tool in BUILD_TOOLS if tool in runs]
    assert dockerfile.exec_form(final, "ENTRYPOINT") + dockerfile.exec_form(final, "CMD") == [
        "attnserve",
        "serve",
    ]


def test_final_stage_env_fits_a_read_only_root(dockerfile: Dockerfile) -> None:
    env = dockerfile.image_env(dockerfile.final)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["ATTNSERVE_HOST"] == "0.0.0.0"
    assert env["ATTNSERVE_PORT"] == "8000"
    assert env["ATTNSERVE_GRPC_PORT"] == "8001"
    assert env["PATH"].startswith("/opt/venv/bin:")
    for key in ("HOME", "XDG_CACHE_HOME", "TORCH_HOME"):
        assert env[key].split("/")[1] == "tmp", f"{key}={env[key]} is outside /tmp"


def test_healthcheck_probes_readiness_without_curl(dockerfile: Dockerfile) -> None:
    (health,) = dockerfile.final.args("HEALTHCHECK")
    command = json.loads(health[health.index("CMD") + 3 :])
    assert command[:2] == ["python", "-c"]
    assert "/health/ready" in command[2] and "urllib" in command[2]


def test_build_context_has_the_copy_sources_and_nothing_else(
    dockerfile: Dockerfile, dockerignore: DockerIgnore
) -> None:
    copies = [a.split()[:-1] for stage in dockerfile.stages for a in stage.args("COPY")]
    sources = [source for args in copies if not args[0].startswith("--from") for source in args]
    assert sources, "no COPY from the build context"
    for source in sources:
        assert (ROOT / source).exists() and not dockerignore.excludes(source), source
    unwanted = [".venv/bin/python", ".git/HEAD", "tests/deploy/test_container.py", "bench/x.json"]
    unwanted += ["service/__pycache__/app.cpython-312.pyc", ".env", "models/x.egg-info/PKG-INFO"]
    assert [path for path in unwanted if not dockerignore.excludes(path)] == []


def _copy_context(dockerignore: DockerIgnore, target: Path) -> None:
    """Copy what the builder would receive: the checkout filtered by .dockerignore."""
    for folder, dirs, files in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if dockerignore.may_include_under((rel / d).as_posix())]
        for name in files:
            path = (rel / name).as_posix()
            if not dockerignore.excludes(path):
                (target / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, target / path)


def test_build_context_installs_the_service_and_its_zoo(
    dockerignore: DockerIgnore, tmp_path: Path
) -> None:
    """`pip install .` in the builder: the wheel from the context holds the code and the zoo."""
    context = tmp_path / "context"
    _copy_context(dockerignore, context)
    probe = context / "models" / "zoo" / "deploy-probe"
    probe.mkdir(parents=True, exist_ok=True)
    (probe / "card.json").write_text("{}")
    (probe / "model.safetensors").write_bytes(b"\0")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*pip_wheel, "-q", "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("attnserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        members = set(archive.namelist())
        entry_points = archive.read("attnserve-0.1.0.dist-info/entry_points.txt").decode()
    shipped = {
        p.relative_to(context).as_posix()
        for top in ("models", "service")
        for p in (context / top).rglob("*")
        if p.is_file() and (p.suffix == ".py" or "zoo" in p.parts)
    }
    assert shipped - members == set()
    assert not [m for m in members if m.startswith("tests/") or m.endswith(".pyc")]
    assert "attnserve = service.cli:main" in entry_points


def _service(config: dict[str, Any], name: str) -> dict[str, Any]:
    return config["services"][name]


def test_compose_service_definition(compose_config: Callable[..., dict[str, Any]]) -> None:
    config = compose_config()
    assert set(config["services"]) == {"attnserve"}
    svc = _service(config, "attnserve")
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device.get("count") in (1, "all")
    assert svc["healthcheck"]["test"][0] == "CMD"
    assert "/health/ready" in " ".join(svc["healthcheck"]["test"])
    assert svc["read_only"] is True and any(t.split(":")[0] == "/tmp" for t in svc["tmpfs"])
    assert svc["restart"] in ("unless-stopped", "always", "on-failure")
    assert [(p["target"], p["published"]) for p in svc["ports"]] == [(8000, "8000"), (8001, "8001")]
    (volume,) = svc["volumes"]
    assert volume["target"] == svc["environment"]["ATTNSERVE_MODEL_REPOSITORY"]
    assert volume["read_only"] is True
    assert Path(volume["source"]) == ROOT / "models" / "zoo"


def test_compose_passes_every_setting_through(
    compose_config: Callable[..., dict[str, Any]],
) -> None:
    from service.settings import ENV_PREFIX, Settings

    names = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    env = _service(compose_config(), "attnserve")["environment"]
    # Host and ports are the image's (0.0.0.0:8000, gRPC 8001); the published ports are the knob.
    assert set(env) == names - {"ATTNSERVE_HOST", "ATTNSERVE_PORT", "ATTNSERVE_GRPC_PORT"}
    chosen = {"MODEL_DIR": "/srv/models", "ATTNSERVE_MAX_BATCH_SIZE": "8"}
    svc = _service(compose_config(env=chosen), "attnserve")
    assert svc["volumes"][0]["source"] == "/srv/models"
    assert svc["environment"]["ATTNSERVE_MAX_BATCH_SIZE"] == "8"
    assert svc["environment"]["ATTNSERVE_DEVICE"] is None


def test_compose_monitoring_profile(compose_config: Callable[..., dict[str, Any]]) -> None:
    config = compose_config("--profile", "monitoring")
    assert set(config["services"]) == {"attnserve", "prometheus", "grafana"}
    for name in ("prometheus", "grafana"):
        svc = _service(config, name)
        assert svc["profiles"] == ["monitoring"]
        image, _, tag = svc["image"].rpartition(":")
        assert image and tag and tag != "latest"
        for volume in svc["volumes"]:
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), volume["source"]
                assert volume["read_only"] is True


def _bind_source(svc: dict[str, Any], target: str) -> Path:
    return Path(next(v["source"] for v in svc["volumes"] if v["target"] == target))


def test_prometheus_scrapes_the_service(compose_config: Callable[..., dict[str, Any]]) -> None:
    config = compose_config("--profile", "monitoring")
    prom = _service(config, "prometheus")
    path = _bind_source(prom, "/etc/prometheus/prometheus.yml")
    assert path == ROOT / "deploy" / "prometheus" / "prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    scrape = yaml.safe_load(path.read_text())["scrape_configs"]
    (job,) = [job for job in scrape if job["job_name"] == "attnserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    port = _service(config, "attnserve")["ports"][0]["target"]
    assert targets == [f"attnserve:{port}"]


def test_grafana_provisioning_matches_the_dashboard(
    compose_config: Callable[..., dict[str, Any]],
) -> None:
    grafana = _service(compose_config("--profile", "monitoring"), "grafana")
    provisioning = _bind_source(grafana, "/etc/grafana/provisioning")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert (source["type"], source["uid"]) == ("prometheus", DATASOURCE_UID)
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "attnserve.yml").read_text())[
        "providers"
    ]
    dashboards = _bind_source(grafana, provider["options"]["path"])
    assert dashboards == ROOT / "deploy" / "grafana" / "dashboards"
    board = json.loads((dashboards / "attnserve.json").read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    assert len(panels) >= 6
    for panel in panels:
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
            assert target["expr"].strip(), panel["title"]


# --- live checks: the app's /metrics and the image's start command ---------------------------

READY_WITHIN_S = 30.0


def _wait_ready(get: Callable[[str], int], alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + READY_WITHIN_S
    while time.monotonic() < deadline:
        assert alive(), "the server exited before it was ready"
        if get("/health/ready") == 200:
            return
        time.sleep(0.2)
    pytest.fail(f"not ready within {READY_WITHIN_S} s")


async def test_dashboard_queries_exist_in_the_service_metrics(
    model_repository: Path,
    coins_png: bytes,
    dashboard_gaps: Callable[[str], list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import httpx

    from service.app import create_app
    from service.settings import ENV_PREFIX, Settings

    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    settings = Settings(model_repository=model_repository, max_batch_size=4, device="cpu")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://attnserve") as client:
            async with asyncio.timeout(READY_WITHIN_S):
                while (await client.get("/health/ready")).status_code != 200:
                    await asyncio.sleep(0.2)
            answer = await client.post(
                "/v1/models/deploy-probe/predict",
                content=coins_png,
                headers={"content-type": "image/png"},
            )
            assert answer.status_code == 200, answer.text
            text = (await client.get("/metrics")).text
    assert dashboard_gaps(text) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status(base: str, path: str) -> int:
    try:
        with urllib.request.urlopen(base + path, timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def _healthcheck(dockerfile: Dockerfile, env: dict[str, str]) -> int:
    (health,) = dockerfile.final.args("HEALTHCHECK")
    command = json.loads(health[health.index("CMD") + 3 :])
    return subprocess.run(command, env=env, timeout=15, check=False).returncode


def _predict(base: str, image: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first served model's description and its answer for `image`."""
    with urllib.request.urlopen(base + "/v1/models", timeout=5) as answer:
        model = json.load(answer)["models"][0]
    request = urllib.request.Request(
        f"{base}/v1/models/{model['name']}/predict?top_k=3",
        data=image,
        headers={"content-type": "image/png"},
    )
    with urllib.request.urlopen(request, timeout=15) as answer:
        return model, json.load(answer)


def test_image_start_command_serves_and_drains_on_sigterm(
    dockerfile: Dockerfile,
    coins_png: bytes,
    local_image_env: Callable[[int], dict[str, str]],
    tmp_path: Path,
) -> None:
    final = dockerfile.final
    command = dockerfile.exec_form(final, "ENTRYPOINT") + dockerfile.exec_form(final, "CMD")
    port = _free_port()
    env = local_image_env(port)
    command[0] = shutil.which(command[0], path=env["PATH"]) or command[0]
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, cwd="/", stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_ready(lambda path: _status(base, path), lambda: proc.poll() is None)
        assert _healthcheck(dockerfile, env) == 0
        model, answer = _predict(base, coins_png)
        (result,) = answer["results"]
        assert answer["model"] == model["name"]
        assert result["image"] == {"width": 384, "height": 303}
        probabilities = [p["probability"] for p in result["predictions"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert {p["label"] for p in result["predictions"]} <= set(model["labels"])
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once its graceful shutdown has finished.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    output = log.read_text()
    assert "Application shutdown complete" in output and "Traceback" not in output, output
    assert _healthcheck(dockerfile, env) != 0
    writes = set(Path(env["DEPLOY_TEST_WRITE_LOG"]).read_text().split())
    allowed = ("/tmp/", "/dev/", f"{tmp_path}/")
    assert not [w for w in writes if not w.startswith(allowed)]
