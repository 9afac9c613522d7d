"""The servers `python -m bench.peers` compares, and the model files they serve.

`export_models` writes, per "arch:block", an attnserve package of the registry's randomly
initialised model (seeded by its name, as ATTNSERVE_RANDOM_MODELS would build it) and the same
module as one frozen TorchScript trace without capture (`model.pt`, with `meta.json`: its data
config) for the peers, plus the trace's top-5 answer on each benchmark photo. `make_server`
turns a spec such as `litserve+workers=2` into a started-on-enter server of that kind.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from bench.inputs import load_inputs
from bench.peer_servers import LitServer, TorchServer
from bench.server import ServerProcess
from models.package import ModelCard, read_card, save_package
from service.imaging import prepare
from service.repository import ModelSource

__all__ = ["SERVER_KINDS", "AttnServer", "Exported", "export_models", "make_server", "parse_spec"]

SERVER_KINDS = {
    "attnserve": (
        "autocast",
        "max_batch_size",
        "delay_ms",
        "instances",
        "workers",
        "channels_last",
    ),
    "litserve": ("workers", "batch", "delay_ms"),
    "torchserve": ("workers", "batch", "delay_ms"),
}


@dataclass(frozen=True)
class Exported:
    """One model's files: attnserve package, TorchScript file, and its top-5 answer per photo."""

    name: str
    package: Path
    script: Path
    reference: dict[str, list[tuple[int, float]]]


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """ "kind+key=value+..." -> (kind, options); ValueError naming the known kinds and keys."""
    kind, *pairs = spec.split("+")
    if kind not in SERVER_KINDS:
        raise ValueError(f"server {spec!r}: unknown kind {kind!r}; known: {list(SERVER_KINDS)}")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in SERVER_KINDS[kind]:
            raise ValueError(
                f"server {spec!r}: {pair!r} is not key=value with a key of {kind}: "
                f"{list(SERVER_KINDS[kind])}"
            )
        options[key] = value
    return kind, options


def export_models(entries: list[str], workdir: Path) -> dict[str, Exported]:
    """Package, TorchScript file and reference answers of each "arch:block" (files reused)."""
    exported = {}
    for entry in entries:
        arch, _, block = entry.partition(":")
        name = f"{arch}-{block}-random"
        root = workdir / name
        package, script = root / "package", root / "model.pt"
        if not (package / "card.json").is_file() or not script.is_file():
            model = ModelSource(name, arch, block).build()
            save_package(model, ModelCard.from_model(model, name), package)
            config = model.data_config
            example = torch.zeros(1, *config.input_size)
            with torch.no_grad():
                torch.jit.save(torch.jit.freeze(torch.jit.trace(model, example).eval()), script)
            meta = {k: getattr(config, k) for k in ("input_size", "mean", "std", "crop_pct")}
            meta.update(interpolation=config.interpolation, labels=list(config.labels))
            (root / "meta.json").write_text(json.dumps(meta))
        exported[name] = Exported(name, package, script, _reference(script, package))
    return exported


def _reference(script: Path, package: Path) -> dict[str, list[tuple[int, float]]]:
    """The TorchScript file's top-5 (class, probability) per benchmark photo."""
    config = read_card(package / "card.json").data_config
    module = torch.jit.load(str(script)).eval()
    answers = {}
    for image in load_inputs("photos-jpeg"):
        tensor = prepare(image.data, [config], max_pixels=10**8)[0].tensor
        with torch.inference_mode():
            values, indices = torch.softmax(module(tensor[None]), dim=1).topk(5, dim=1)
        answers[image.name] = list(zip(indices[0].tolist(), values[0].tolist(), strict=True))
    return answers


def make_server(spec: str, exported: dict[str, Exported], args: Any) -> Any:
    """The server a spec names (not started: use it as a context manager)."""
    kind, options = parse_spec(spec)
    cls = {"attnserve": AttnServer, "litserve": LitServer, "torchserve": TorchServer}[kind]
    return cls(spec, options, exported, args)


class AttnServer:
    """attnserve on a repository of the exported packages, each with a config.json from the
    spec's options; JSON logs at info, so the access log gives each request's timings."""

    def __init__(
        self, spec: str, options: dict[str, str], exported: dict[str, Exported], args: Any
    ) -> None:
        self.spec, self.options, self.exported = spec, options, exported
        self.repository = Path(args.workdir) / "repositories" / spec.replace("=", "-")
        self.process: ServerProcess | None = None

    def check_installed(self) -> None:
        """attnserve is always here."""

    def config_json(self) -> dict[str, Any]:
        """The models' config.json for the spec's options."""
        o, config = self.options, {}
        if "max_batch_size" in o:
            config["max_batch_size"] = int(o["max_batch_size"])
        if "delay_ms" in o:
            delay_us = int(float(o["delay_ms"]) * 1000)
            config["dynamic_batching"] = {"max_queue_delay_microseconds": delay_us}
        if "instances" in o:
            config["instance_group"] = [{"count": int(o["instances"]), "kind": "KIND_CPU"}]
        if "autocast" in o:
            config["parameters"] = {"autocast": {"string_value": o["autocast"]}}
        return config

    def __enter__(self) -> AttnServer:
        shutil.rmtree(self.repository, ignore_errors=True)
        for name, files in self.exported.items():
            directory = self.repository / name
            directory.mkdir(parents=True)
            for item in files.package.iterdir():
                (directory / item.name).symlink_to(item.resolve())
            (directory / "config.json").write_text(json.dumps(self.config_json()))
        settings = {
            "model_repository": str(self.repository),
            "models": ",".join(self.exported),
            "log_format": "json",
            "log_level": "info",
        }
        server_wide = {"workers": "ATTNSERVE_INSTANCES", "channels_last": "ATTNSERVE_CHANNELS_LAST"}
        extra = {env: self.options[key] for key, env in server_wide.items() if key in self.options}
        self.process = ServerProcess(settings, extra_env=extra)
        self.process.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None:
            self.process.__exit__(exc_type, exc, tb)

    @property
    def port(self) -> int:
        assert self.process is not None
        return self.process.port

    def path(self, model: str) -> str:
        return f"/v1/models/{model}/predict?maps=none"

    def log_offset(self) -> int:
        assert self.process is not None
        return self.process.log_path.stat().st_size

    def access_records(self, start: int, end: int) -> list[dict[str, Any]]:
        """The answered predict requests logged between two log offsets."""
        assert self.process is not None
        with self.process.log_path.open("rb") as log:
            log.seek(start)
            lines = log.read(end - start).splitlines()
        records = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("logger") == "attnserve.access" and entry.get("status") == 200:
                records.append(entry)
        return records
