"""The model repository: which models and versions to serve, read from the directory tree.

A model directory holds either a package (card.json and weights: version 1) or numbered version
directories `<name>/<n>/`, each a package, and optionally a `config.json` (service.model_config:
version policy and serving knobs). Scanning only reads card.json and config.json files, so it is
cheap enough to repeat (poll mode); configuration mistakes that concern the service as a whole
(an unknown model name, a bad "arch:block", a block route to a model not served) stop it before
it listens, while a bad package or config fails only that model, with the reason kept.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models import ATTENTION_BLOCKS, DataConfig, create_model, list_models, load_package
from models.attention import SINGLE_BLOCKS
from models.package import CARD_FILE, read_card
from service.model_config import ModelConfig, read_config
from service.settings import Settings

__all__ = [
    "FALLBACK_ARCH",
    "ConfigError",
    "ModelDir",
    "ModelSource",
    "discover",
    "random_sources",
    "scan_repository",
]

logger = logging.getLogger(__name__)

FALLBACK_ARCH = "resnet_small"
Stamp = tuple[tuple[str, int, int], ...]


class ConfigError(ValueError):
    """The configuration cannot be served; raised before the service starts listening."""


@dataclass(frozen=True)
class ModelSource:
    """Where one version of a hosted model comes from: a package directory, or random weights
    for arch:block; `config` is its model's config.json, `stamp` its files' sizes and times
    (a changed stamp in poll mode means a changed version)."""

    name: str
    arch: str
    attention: str
    package: Path | None = None
    data_config: DataConfig | None = None
    error: str | None = None
    version: int = 1
    config: ModelConfig = field(default_factory=ModelConfig)
    stamp: Stamp = ()

    @property
    def random_weights(self) -> bool:
        return self.package is None

    def build(self) -> nn.Module:
        """Load the package, or create the model with a seed derived from its name (CPU)."""
        if self.error is not None:
            raise ValueError(self.error)
        if self.package is not None:
            return load_package(self.package)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(self.name.encode()))
            return create_model(self.arch, self.attention).eval()


@dataclass(frozen=True)
class ModelDir:
    """One model of the repository: every version found on disk and its config."""

    name: str
    versions: dict[int, ModelSource]
    config: ModelConfig

    def selected(self) -> list[ModelSource]:
        """The versions the version policy serves, highest first."""
        return [self.versions[v] for v in self.config.select(list(self.versions))]


def _stamp(directory: Path) -> Stamp:
    """Name, size and modification time of every file of a package directory."""
    try:
        entries = sorted(p for p in directory.iterdir() if p.is_file())
        return tuple((p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in entries)
    except OSError:
        return ()


def _version_source(
    name: str, version: int, directory: Path, config: ModelConfig, error: str | None
) -> ModelSource:
    """A version's source from its card (a failed source, with the reason, if unreadable)."""
    stamp = _stamp(directory)
    if error is not None:
        return ModelSource(name, "?", "?", directory, None, error, version, config, stamp)
    try:
        card = read_card(directory / CARD_FILE)
    except (OSError, ValueError) as exc:
        return ModelSource(name, "?", "?", directory, None, str(exc), version, config, stamp)
    return ModelSource(
        name, card.arch, card.attention, directory, card.data_config, None, version, config, stamp
    )


def _model_dir(directory: Path) -> ModelDir | None:
    """The model in `directory`: numbered version directories, else a flat package (version 1)."""
    numbered = {
        int(p.name): p
        for p in directory.iterdir()
        if p.is_dir() and p.name.isdigit() and int(p.name) > 0 and (p / CARD_FILE).is_file()
    }
    flat = (directory / CARD_FILE).is_file()
    if not numbered and not flat:
        return None
    error = None
    try:
        config = read_config(directory)
    except ValueError as exc:
        config, error = ModelConfig(), str(exc)
    if numbered:
        name = directory.name
        versions = {
            v: _version_source(name, v, path, config, error) for v, path in numbered.items()
        }
        return ModelDir(name, versions, config)
    source = _version_source(directory.name, 1, directory, config, error)
    if source.error is None:  # a flat package is named by its card
        card = read_card(directory / CARD_FILE)
        source = ModelSource(
            card.name, card.arch, card.attention, directory, card.data_config, None, 1, config,
            source.stamp,
        )  # fmt: skip
    return ModelDir(source.name, {1: source}, config)


def scan_repository(repository: Path) -> dict[str, ModelDir]:
    """Every model directory of the repository by model name (ConfigError if it is missing)."""
    if not repository.is_dir():
        raise ConfigError(f"model repository {str(repository)!r} is not a directory")
    models: dict[str, ModelDir] = {}
    for directory in sorted(p for p in repository.iterdir() if p.is_dir()):
        try:
            model = _model_dir(directory)
        except OSError as exc:
            logger.warning("skipping %s: %s", directory, exc)
            continue
        if model is None:
            continue
        if model.name in models:
            logger.warning("skipping %s: model %r is defined more than once", directory, model.name)
            continue
        models[model.name] = model
    return models


def random_sources(entries: list[str]) -> list[ModelSource]:
    sources = []
    for entry in entries:
        arch, _, block = entry.partition(":")
        if arch not in list_models():
            raise ConfigError(
                f"random model {entry!r}: unknown arch {arch!r}; valid: {list_models()}"
            )
        if block not in ATTENTION_BLOCKS:
            raise ConfigError(
                f"random model {entry!r}: unknown block {block!r}; valid: {list(ATTENTION_BLOCKS)}"
            )
        sources.append(ModelSource(f"{arch}-{block}-random", arch, block))
    return sources


def discover(settings: Settings) -> list[ModelSource]:
    """The model versions to serve at start, sorted by name; ConfigError for anything that
    cannot be served. Explicit model control starts with only the models named in `models`."""
    models = scan_repository(Path(settings.model_repository))
    if not models:
        logger.warning(
            "model repository %s holds no model packages: serving randomly initialised %s "
            "digit models (digits-<block>); their predictions are meaningless",
            settings.model_repository,
            FALLBACK_ARCH,
        )
        fallback = [ModelSource(f"digits-{b}", FALLBACK_ARCH, b) for b in SINGLE_BLOCKS]
        models = {s.name: ModelDir(s.name, {1: s}, ModelConfig()) for s in fallback}
    if settings.models:
        unknown = [n for n in settings.models if n not in models]
        if unknown:
            raise ConfigError(f"unknown model(s) {unknown}; available: {sorted(models)}")
        models = {n: m for n, m in models.items() if n in settings.models}
    elif settings.model_control_mode == "explicit":
        models = {}
    randoms = random_sources(settings.random_models)
    names = [s.name for s in randoms]
    duplicates = sorted({n for n in names if n in models or names.count(n) > 1})
    sources = [s for m in models.values() for s in m.selected()] + randoms
    if duplicates:
        raise ConfigError(f"model name(s) {duplicates} are defined more than once")
    _check_routes(settings.block_routes, sources)
    return sorted(sources, key=lambda s: (s.name, -s.version))


def _check_routes(routes: dict[str, str], sources: list[ModelSource]) -> None:
    by_name = {s.name: s for s in sources}
    for block, name in routes.items():
        source = by_name.get(name)
        if source is None:
            raise ConfigError(
                f"block_routes: {block!r} -> {name!r}, but {name!r} is not served; "
                f"served: {sorted(by_name)}"
            )
        if source.attention != block:
            raise ConfigError(
                f"block_routes: {block!r} -> {name!r}, but {name!r} uses block {source.attention!r}"
            )
