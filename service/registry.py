"""The hosted models: which to serve (discovery, at start-up) and bringing them up (loading).

Discovery only reads card.json files, so configuration mistakes (an unknown model name, a bad
"arch:block", a block route to a model not served) stop the service before it listens. Loading
and warm-up run later, one model at a time, and each model reports its own status.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from models import ATTENTION_BLOCKS, DataConfig, create_model, list_models, list_sites, load_package
from models.package import CARD_FILE, read_card
from service.batching import Batcher, BatchObserver
from service.errors import NotReady, UnknownModel
from service.pipeline import ItemOutput, PredictItem, make_batch_handler
from service.settings import Settings
from service.worker import DeviceWorker, ModelRunner

__all__ = ["ConfigError", "HostedModel", "ModelRegistry", "ModelSource", "discover"]

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


@dataclass(eq=False)
class HostedModel:
    """One served model and its state: pending -> loading -> ready, or failed with a reason."""

    source: ModelSource
    status: str = "pending"
    error: str | None = None
    config: DataConfig | None = None
    batcher: Batcher[PredictItem, ItemOutput] | None = None
    sites: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def attention(self) -> str:
        return self.source.attention

    @property
    def data_config(self) -> DataConfig:
        """The loaded model's data config (a package's is known from its card before that)."""
        config = self.config or self.source.data_config
        if config is None:
            raise NotReady(f"model {self.name!r} is {self.status}")
        return config

    def info(self) -> dict[str, Any]:
        """The /v1/models entry (labels and sites once known)."""
        config = self.config or self.source.data_config
        return {
            "name": self.name,
            "arch": self.source.arch,
            "attention": self.attention,
            "status": self.status,
            "random_weights": self.source.random_weights,
            "labels": list(config.labels) if config else None,
            "input_size": list(config.input_size) if config else None,
            "sites": self.sites,
        }

    async def submit(self, item: PredictItem, timeout: float) -> ItemOutput:
        """Queue one image on this model's batcher and wait for its output."""
        return await self.enqueue(item, timeout)

    def enqueue(self, item: PredictItem, timeout: float) -> asyncio.Future[ItemOutput]:
        """Queue one image on this model's batcher: the future of its output (NotReady at once
        until the model is loaded and warm; see `Batcher.enqueue`)."""
        if self.batcher is None or self.status != "ready":
            reason = f": {self.error}" if self.error else ""
            raise NotReady(f"model {self.name!r} is {self.status}{reason}")
        return self.batcher.enqueue(item, timeout=timeout)


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


def warmup_sizes(device: torch.device, max_batch_size: int) -> list[int]:
    """CPU: 1 and the maximum; CUDA: every power of two up to the maximum (and the maximum)."""
    if device.type != "cuda":
        return sorted({1, max_batch_size})
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size]
    return sorted({*sizes, max_batch_size})


class ModelRegistry:
    """The hosted models by name; brings them up one by one and stops their batchers."""

    def __init__(self, sources: list[ModelSource], block_routes: dict[str, str]) -> None:
        self.models = {s.name: HostedModel(s) for s in sources}
        self._routes = dict(block_routes)

    @property
    def loaded(self) -> int:
        """How many models finished loading (ready or failed)."""
        return sum(m.status in ("ready", "failed") for m in self.models.values())

    def get(self, name: str) -> HostedModel:
        """The model called `name`; UnknownModel (404) listing the served names otherwise."""
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(f"no model {name!r}; served models: {sorted(self.models)}") from None

    def for_block(self, block: str) -> HostedModel:
        """The model answering for an attention block: the configured route, else first by name."""
        if block in self._routes:
            return self.models[self._routes[block]]
        for name in sorted(self.models):
            if self.models[name].attention == block:
                return self.models[name]
        blocks = sorted({m.attention for m in self.models.values()})
        raise UnknownModel(f"no served model uses attention block {block!r}; served: {blocks}")

    async def load_all(
        self,
        worker: DeviceWorker,
        pool: Executor,
        settings: Settings,
        observer: BatchObserver | None,
    ) -> None:
        """Load, warm up and start every model in turn; a failure marks only that model."""
        sizes = warmup_sizes(worker.device, settings.max_batch_size)
        for hosted in self.models.values():
            try:
                await self._bring_up(hosted, worker, pool, settings, observer, sizes)
            except Exception as exc:
                hosted.status, hosted.error = "failed", f"{type(exc).__name__}: {exc}"
                logger.exception("model %s failed to load", hosted.name)

    async def _bring_up(
        self,
        hosted: HostedModel,
        worker: DeviceWorker,
        pool: Executor,
        settings: Settings,
        observer: BatchObserver | None,
        sizes: list[int],
    ) -> None:
        loop = asyncio.get_running_loop()
        hosted.status = "loading"
        started = loop.time()
        model = await loop.run_in_executor(pool, hosted.source.build)
        runner = await worker.run(
            ModelRunner,
            hosted.name,
            model,
            device=worker.device,
            autocast=settings.autocast,
            channels_last=settings.channels_last,
            trace=settings.trace_models,
        )
        await worker.run(runner.warmup, sizes)
        hosted.sites = [
            {"site": s.site, "block": s.block, "kinds": list(s.kinds)}
            for s in list_sites(runner.model, derived=True)
        ]
        hosted.config = cast(DataConfig, runner.model.data_config)
        hosted.batcher = Batcher(
            hosted.name,
            make_batch_handler(runner),
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            observer=observer,
            max_concurrent_batches=worker.instances,
            executor=worker,
        )
        hosted.batcher.start()
        hosted.status = "ready"
        logger.info(
            "model %s ready on %s (warm-up sizes %s) in %.2fs",
            hosted.name,
            worker.device,
            sizes,
            loop.time() - started,
        )

    async def stop(self, timeout: float) -> None:
        """Stop intake on every batcher and let each drain its queue (up to `timeout` seconds)."""
        batchers = [m.batcher for m in self.models.values() if m.batcher is not None]
        await asyncio.gather(*(b.stop(drain=True, timeout=timeout) for b in batchers))
        for hosted in self.models.values():
            if hosted.status == "ready":
                hosted.status = "stopped"
