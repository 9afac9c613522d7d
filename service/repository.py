"""The model repository: which models to serve, found at start-up before the service listens.

Discovery only reads card.json files, so configuration mistakes (an unknown model name, a bad
"arch:block", a block route to a model not served) stop the service before it listens.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models import ATTENTION_BLOCKS, DataConfig, create_model, list_models, load_package
from models.package import CARD_FILE, read_card
from service.settings import Settings

__all__ = ["FALLBACK_ARCH", "ConfigError", "ModelSource", "discover"]

logger = logging.getLogger(__name__)

FALLBACK_ARCH = "resnet_small"


class ConfigError(ValueError):
    """The configuration cannot be served; raised before the service starts listening."""


@dataclass(frozen=True)
class ModelSource:
    """Where a hosted model comes from: a package directory, or random weights for arch:block."""

    name: str
    arch: str
    attention: str
    package: Path | None = None
    data_config: DataConfig | None = None
    error: str | None = None

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


def _scan(repository: Path) -> list[ModelSource]:
    """Every subdirectory holding a card.json; unreadable cards become failed sources."""
    if not repository.is_dir():
        raise ConfigError(f"model repository {str(repository)!r} is not a directory")
    sources = []
    for directory in sorted(p for p in repository.iterdir() if (p / CARD_FILE).is_file()):
        try:
            card = read_card(directory / CARD_FILE)
        except (OSError, ValueError) as exc:
            sources.append(ModelSource(directory.name, "?", "?", directory, error=str(exc)))
            continue
        sources.append(
            ModelSource(card.name, card.arch, card.attention, directory, card.data_config)
        )
    return sources


def _random_sources(entries: list[str]) -> list[ModelSource]:
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
    """The models to serve, sorted by name; ConfigError for anything that cannot be served."""
    sources = _scan(Path(settings.model_repository))
    if not sources:
        logger.warning(
            "model repository %s holds no model packages: serving randomly initialised %s "
            "digit models (digits-<block>); their predictions are meaningless",
            settings.model_repository,
            FALLBACK_ARCH,
        )
        sources = [ModelSource(f"digits-{b}", FALLBACK_ARCH, b) for b in ATTENTION_BLOCKS]
    if settings.models:
        available = {s.name for s in sources}
        unknown = [n for n in settings.models if n not in available]
        if unknown:
            raise ConfigError(f"unknown model(s) {unknown}; available: {sorted(available)}")
        sources = [s for s in sources if s.name in settings.models]
    sources += _random_sources(settings.random_models)
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"model name(s) {duplicates} are defined more than once")
    _check_routes(settings.block_routes, sources)
    return sorted(sources, key=lambda s: s.name)


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
