"""The Helm chart and the KServe manifests, rendered and validated offline.

Helm itself renders the chart (Helm v4's Go library inside the helm-python-sdk wheel; no cluster,
no helm binary) with each shipped values file. Every built-in object is validated strictly
against Kubernetes' OpenAPI schemas (kubernetes-validate), every custom resource against its
vendored CRD schema (tests/deploy/crds/SOURCES.md) with unknown fields refused. Then what matters
is checked against the real service: the probes answer 200 from the app, the ConfigMap holds only
real settings that Settings accepts, the grace period outlasts the drain, the autoscaling metric
is in a real /metrics, and the ports are the Dockerfile's EXPOSE.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from conftest import Dockerfile

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is in the dev extra")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="in the dev extra")
jsonschema = pytest.importorskip("jsonschema", reason="comes with kubernetes-validate")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "attnserve"
KSERVE = ROOT / "deploy" / "kserve"
CRDS = Path(__file__).with_name("crds")
RELEASE, NAMESPACE = "attnserve", "ml"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest schema known.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())

VALUES = {
    "gpu": None,
    "cpu": "values-cpu.yaml",
    "prometheus-adapter": "values-prometheus-adapter.yaml",
    "keda": "values-keda.yaml",
    "auth": "values-auth.yaml",
    "object-storage": "values-object-storage.yaml",
}
COMMON_KINDS = {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}
EXTRA_KINDS = {
    "gpu": {"ServiceMonitor"},
    "cpu": {"ServiceMonitor"},
    "prometheus-adapter": {"ServiceMonitor", "HorizontalPodAutoscaler"},
    "keda": {"ServiceMonitor", "ScaledObject"},
    "auth": {"ServiceMonitor", "Secret"},
    "object-storage": {"ServiceMonitor"},
}


def _values(variant: str) -> dict[str, Any]:
    name = VALUES[variant]
    return yaml.safe_load((CHART / name).read_text()) if name else {}


def render(variant: str) -> list[dict[str, Any]]:
    """The chart's objects for one values file, as `helm template` would print them."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(_values(variant), name=RELEASE, namespace=NAMESPACE)
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {variant: render(variant) for variant in VALUES}


def kserve_objects() -> list[dict[str, Any]]:
    return [d for p in sorted(KSERVE.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]


def one(objects: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{len(found)} {kind} objects named *{suffix}"
    return found[0]


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (main,) = [c for c in pod_spec(objects)["containers"] if c["name"] == "attnserve"]
    return main


def configmap_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    return one(objects, "ConfigMap", RELEASE)["data"]


# --- schemas --------------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields where the API server would prune them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def _crd_text(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> a validator of the strict openAPIV3Schema of each served version."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml*")):
        crd = yaml.load(_crd_text(path), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        spec = crd["spec"]
        for version in spec["versions"]:
            if version["served"]:
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                strict = _strict(version["schema"]["openAPIV3Schema"])
                jsonschema.Draft7Validator.check_schema(strict)
                schemas[key] = jsonschema.Draft7Validator(strict)
    return schemas


def test_vendored_crds_are_the_released_files() -> None:
    rows = re.findall(
        r"^\| (\S+) \| .* \| ([0-9a-f]{64}) \|$", (CRDS / "SOURCES.md").read_text(), re.M
    )
    assert {name for name, _ in rows} == {p.name for p in CRDS.glob("*.yaml*")}
    for name, digest in rows:
        assert hashlib.sha256(_crd_text(CRDS / name).encode()).hexdigest() == digest, name


def _validate(obj: dict[str, Any], crd_schemas: dict[tuple[str, str], Any]) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in crd_schemas:
        crd_schemas[key].validate(obj)
        return
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("variant", VALUES)
def test_chart_renders_valid_objects(
    variant: str,
    rendered: dict[str, list[dict[str, Any]]],
    crd_schemas: dict[tuple[str, str], Any],
) -> None:
    objects = rendered[variant]
    assert {o["kind"] for o in objects} == COMMON_KINDS | EXTRA_KINDS[variant]
    for obj in objects:
        _validate(obj, crd_schemas)


def test_validation_refuses_an_unknown_field(
    rendered: dict[str, list[dict[str, Any]]],
    crd_schemas: dict[tuple[str, str], Any],
) -> None:
    """The strictness is real: a misspelt field fails both kinds of schema."""
    deployment = json.loads(json.dumps(one(rendered["gpu"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment, crd_schemas)
    monitor = json.loads(json.dumps(one(rendered["gpu"], "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        _validate(monitor, crd_schemas)


def test_helm_lint_strict_finds_nothing() -> None:
    for variant in VALUES:
        report = helm.lint(CHART, _values(variant), strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert problems == [], variant


def test_kserve_manifests_validate(crd_schemas: dict[tuple[str, str], Any]) -> None:
    objects = kserve_objects()
    assert {o["kind"] for o in objects} == {"ServingRuntime", "InferenceService"}
    for obj in objects:
        _validate(obj, crd_schemas)


def test_chart_refuses_settings_it_owns_and_unknown_modes() -> None:
    with helm.Chart.load(CHART) as chart:
        for values in (
            {"settings": {"port": 9000}},
            {"modelRepository": {"source": "nfs"}},
            {"autoscaling": {"enabled": True, "mode": "cpu"}},
            {"auth": {"enabled": True}},
        ):
            with pytest.raises(helm.HelmError):
                chart.render(values, name=RELEASE, namespace=NAMESPACE)


# --- invariants -----------------------------------------------------------------------------


def _settings_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {k: v for k, v in configmap_env(objects).items() if k.startswith("ATTNSERVE_")}


def _kserve_env() -> dict[str, str]:
    runtime = one(kserve_objects(), "ServingRuntime")
    (main,) = runtime["spec"]["containers"]
    return {e["name"]: e["value"] for e in main["env"]}


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, **override: Any) -> Any:
    """Settings as the pod builds them from `env` (plus test-only overrides)."""
    from service.settings import ENV_PREFIX, Settings

    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(**override)


@pytest.mark.parametrize("variant", VALUES)
def test_configmap_holds_only_real_settings(
    variant: str, rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.settings import ENV_PREFIX, Settings

    data = configmap_env(rendered[variant])
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert set(data) - fields == set()
    settings = _settings(data, monkeypatch)  # every value is one the service accepts
    assert (settings.host, settings.log_format) == ("0.0.0.0", "json")
    if variant == "cpu":
        assert settings.device == "cpu"


def test_kserve_runtime_env_holds_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import ENV_PREFIX, Settings

    env = _kserve_env()
    assert set(env) - {ENV_PREFIX + name.upper() for name in Settings.model_fields} == set()
    settings = _settings(env, monkeypatch)
    assert str(settings.model_repository) == "/mnt/models"  # KServe's storage initializer


def _grace_floor(settings: Any) -> float:
    from service.server import GRACEFUL_SHUTDOWN_S
    from service.state import DRAIN_TIMEOUT_S

    # A request admitted just before the port closes may run request_timeout_s; the server's own
    # worst case is the delay, uvicorn's wait for connections and the batchers' drain.
    return settings.drain_delay_s + max(
        settings.request_timeout_s, GRACEFUL_SHUTDOWN_S + DRAIN_TIMEOUT_S
    )


@pytest.mark.parametrize("variant", VALUES)
def test_grace_period_outlasts_the_drain(
    variant: str, rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered[variant]
    settings = _settings(configmap_env(objects), monkeypatch)
    assert pod_spec(objects)["terminationGracePeriodSeconds"] > _grace_floor(settings)
    assert "lifecycle" not in container(objects)  # the drain delay does what a preStop would


def test_kserve_grace_period_outlasts_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    service = one(kserve_objects(), "InferenceService")
    settings = _settings(_kserve_env(), monkeypatch)
    assert service["spec"]["predictor"]["terminationGracePeriodSeconds"] > _grace_floor(settings)


def test_ports_are_the_images(
    dockerfile: Dockerfile, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    exposed = {int(p) for args in dockerfile.final.args("EXPOSE") for p in args.split()}
    for objects in rendered.values():
        ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
        assert set(ports.values()) == exposed
        data = configmap_env(objects)
        assert (int(data["ATTNSERVE_PORT"]), int(data["ATTNSERVE_GRPC_PORT"])) == (
            ports["http"],
            ports["grpc"],
        )
        service = one(objects, "Service")["spec"]["ports"]
        assert {(p["name"], p["port"], p["targetPort"]) for p in service} == {
            (name, port, name) for name, port in ports.items()
        }
    (runtime,) = one(kserve_objects(), "ServingRuntime")["spec"]["containers"]
    assert [p["containerPort"] for p in runtime["ports"]] == [int(_kserve_env()["ATTNSERVE_PORT"])]
    assert int(_kserve_env()["ATTNSERVE_PORT"]) in exposed


def test_pod_is_locked_down(
    dockerfile: Dockerfile, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    image_user = int(dockerfile.final.args("USER")[-1].split(":")[0])
    for variant, objects in rendered.items():
        spec = pod_spec(objects)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == image_user
        assert spec["automountServiceAccountToken"] is False
        for box in spec["containers"] + spec.get("initContainers", []):
            context = box["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (variant, box["name"])
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container(objects)["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        spread = {c["topologyKey"] for c in spec["topologySpreadConstraints"]}
        assert "kubernetes.io/hostname" in spread


def test_gpu_and_cpu_resources(rendered: dict[str, list[dict[str, Any]]]) -> None:
    gpu = container(rendered["gpu"])["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] == 1
    cpu = container(rendered["cpu"])
    assert "nvidia.com/gpu" not in json.dumps(cpu["resources"])
    assert container(rendered["cpu"])["image"].endswith("-cpu")
    assert "tolerations" not in pod_spec(rendered["cpu"])
    isvc = one(kserve_objects(), "InferenceService")["spec"]["predictor"]
    assert isvc["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_model_repository_from_a_pvc_or_object_storage(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for variant, kind in (("gpu", "persistentVolumeClaim"), ("object-storage", "emptyDir")):
        objects = rendered[variant]
        path = configmap_env(objects)["ATTNSERVE_MODEL_REPOSITORY"]
        spec = pod_spec(objects)
        (mount,) = [m for m in container(objects)["volumeMounts"] if m["mountPath"] == path]
        assert mount["readOnly"] is True
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert kind in volume
    (fetch,) = pod_spec(rendered["object-storage"])["initContainers"]
    assert fetch["args"][0] == "copy" and fetch["args"][-1] == "/models"
    assert {m["name"] for m in fetch["volumeMounts"]} >= {mount["name"]}
    model = one(kserve_objects(), "InferenceService")["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and model["storageUri"].startswith("pvc://")
    assert model["runtime"] == one(kserve_objects(), "ServingRuntime")["metadata"]["name"]


def test_auth_secret_is_a_key_file_the_service_loads(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    from service.auth import KeyRing

    objects = rendered["auth"]
    secret = one(objects, "Secret")
    path = Path(configmap_env(objects)["ATTNSERVE_API_KEYS_FILE"])
    mounts = {m["name"]: m["mountPath"] for m in container(objects)["volumeMounts"]}
    (volume,) = [v for v in pod_spec(objects)["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert str(path.parent) == mounts[volume["name"]]
    (item,) = volume["secret"]["items"]
    assert item["path"] == path.name
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(secret["stringData"][item["key"]])
    ring = KeyRing.load(keys_file)
    assert len(ring.entries) == 1
    assert "Secret" not in {o["kind"] for o in rendered["gpu"]}


def test_dashboard_configmap_is_the_shipped_dashboard(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    board = one(rendered["gpu"], "ConfigMap", "-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (ROOT / "deploy" / "grafana" / "dashboards" / "attnserve.json").read_text()
    expected = json.loads(shipped.replace('"attnserve-prometheus"', '"prometheus"'))
    assert json.loads(board["data"]["attnserve.json"]) == expected


def _adapter_rule(objects: list[dict[str, Any]]) -> dict[str, Any]:
    config = one(objects, "ConfigMap", "-prometheus-adapter-rules")["data"]["config.yaml"]
    (rule,) = yaml.safe_load(config)["rules"]
    return rule


def test_autoscalers_target_the_deployment_on_the_per_pod_rule(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["prometheus-adapter"]
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    deployment = one(objects, "Deployment")
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    rule = _adapter_rule(objects)
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "<<.GroupBy>>" in rule["metricsQuery"]
    keda = one(rendered["keda"], "ScaledObject")["spec"]
    assert keda["scaleTargetRef"]["name"] == one(rendered["keda"], "Deployment")["metadata"]["name"]
    monitor = one(rendered["keda"], "ServiceMonitor")["spec"]
    assert monitor["endpoints"][0]["port"] == "http"
    assert monitor["endpoints"][0]["path"] == "/metrics"


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\battnserve_\w+", expr))


async def test_probes_and_autoscaling_metric_against_the_app(
    rendered: dict[str, list[dict[str, Any]]],
    model_repository: Path,
    coins_png: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CPU pod's settings, probes and scraped metrics, served by the real app in-process."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from service.app import create_app

    objects = rendered["cpu"]
    settings = _settings(
        configmap_env(objects), monkeypatch, model_repository=model_repository, max_batch_size=4
    )
    main = container(objects)
    probes = [
        main[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")
    ]
    probes.append(
        one(kserve_objects(), "ServingRuntime")["spec"]["containers"][0]["readinessProbe"][
            "httpGet"
        ]["path"]
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://attnserve") as client:
            async with asyncio.timeout(60):
                while (await client.get("/health/ready")).status_code != 200:
                    await asyncio.sleep(0.2)
            for path in probes:
                assert (await client.get(path)).status_code == 200, path
            answer = await client.post(
                "/v1/models/deploy-probe/predict",
                content=coins_png,
                headers={"content-type": "image/png"},
            )
            assert answer.status_code == 200, answer.text
            exposition = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    rule = _adapter_rule(rendered["prometheus-adapter"])
    series = _metric_names(rule["seriesQuery"])
    keda_query = one(rendered["keda"], "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    assert series == _metric_names(keda_query) == {"attnserve_queue_depth"}
    for name in series:
        assert families[name].type == "gauge"  # a level per pod, not a counter to rate()
        labels = {k for s in families[name].samples for k in s.labels}
        assert labels >= {"model"}, labels
        # The rule's selectors name only the labels Prometheus adds to the scraped target.
        assert not labels & {"namespace", "pod", "service"}
