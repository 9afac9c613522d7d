"""The hosted model versions and their lifecycle: pending -> loading -> ready (or failed) ->
unloading -> stopped.

Loading and warm-up run after the service starts listening, one version at a time, and each
reports its own status; a ready version has a batcher whose handler runs on the device worker.
A model name may have several versions; without a version, requests go to the highest ready one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from models import DataConfig, list_sites
from models.package import PackageError
from service.batching import Batcher
from service.budget import MapCounts
from service.device import DeviceWorker
from service.errors import NotReady, UnknownModel
from service.forward import ImageResult, Item, map_counts, run_batch
from service.metrics import Metrics
from service.repository import ModelSource
from service.runner import ModelRunner
from service.settings import Settings

__all__ = ["HostedModel", "ModelRegistry", "failure_reason", "warmup_sizes"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class HostedModel:
    """One served model and its state: pending -> loading -> ready, or failed with a reason."""

    source: ModelSource
    status: str = "pending"
    error: str | None = None
    config: DataConfig | None = None
    batcher: Batcher[Item, ImageResult] | None = None
    sites: list[dict[str, Any]] = field(default_factory=list)
    map_counts: MapCounts = field(default_factory=lambda: MapCounts(0, 0))  # set when loaded
    in_flight: int = 0
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def version(self) -> int:
        return self.source.version

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Count a request as using this version from admission to answer, so that unloading
        waits for it (`drained`)."""
        self.in_flight += 1
        self._released.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._released.set()

    async def drained(self, timeout: float) -> bool:
        """Wait until no admitted request uses this version (True), or `timeout` seconds."""
        if self.in_flight == 0:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._released.wait()
        except TimeoutError:
            return False
        return True

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

    async def submit(self, item: Item, timeout: float) -> ImageResult:
        """Queue one image on this model's batcher and wait for its result (NotReady at once
        until the model is loaded and warm). Requests admitted before an unload still run; the
        model's own timeout (config.json), when set, replaces `timeout`."""
        if self.batcher is None or self.status not in ("ready", "unloading"):
            reason = f": {self.error}" if self.error else ""
            raise NotReady(f"model {self.name!r} version {self.version} is {self.status}{reason}")
        own = self.source.config.timeout_s
        return await self.batcher.submit(item, timeout=timeout if own is None else own)


def failure_reason(exc: BaseException) -> str:
    """What clients are told about a model that failed to load: a short reason, never the
    exception's text (it holds paths and checksums; the log has all of it)."""
    if isinstance(exc, PackageError):
        return "its package is invalid (see the server log)"
    if isinstance(exc, OSError):
        return "its files could not be read (see the server log)"
    return "loading failed (see the server log)"


def warmup_sizes(device: torch.device, max_batch_size: int) -> list[int]:
    """CPU: 1 and the maximum; CUDA: every power of two up to the maximum (and the maximum)."""
    if device.type != "cuda":
        return sorted({1, max_batch_size})
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size]
    return sorted({*sizes, max_batch_size})


class ModelRegistry:
    """The hosted versions by model name; brings them up one by one, retires and stops them."""

    def __init__(self, sources: list[ModelSource], block_routes: dict[str, str]) -> None:
        self.versions: dict[str, dict[int, HostedModel]] = {}
        for source in sources:
            self.versions.setdefault(source.name, {})[source.version] = HostedModel(source)
        self._routes = dict(block_routes)

    @property
    def models(self) -> dict[str, HostedModel]:
        """Each model's default version: the highest ready one, else the highest."""
        return {name: _default(v) for name, v in sorted(self.versions.items()) if v}

    def hosted(self) -> list[HostedModel]:
        """Every hosted version, by name and version."""
        return [v[n] for _, v in sorted(self.versions.items()) for n in sorted(v)]

    @property
    def loaded(self) -> int:
        """How many models finished loading (every version ready or failed)."""
        return sum(
            all(m.status not in ("pending", "loading") for m in v.values())
            for v in self.versions.values()
            if v
        )

    def get(self, name: str, version: int | None = None) -> HostedModel:
        """Version `version` of model `name`, by default its highest ready one; UnknownModel
        (404) listing what is served otherwise."""
        versions = self.versions.get(name)
        if not versions:
            raise UnknownModel(f"no model {name!r}; served models: {sorted(self.models)}")
        if version is None:
            return _default(versions)
        if version not in versions:
            raise UnknownModel(
                f"model {name!r} has no version {str(version)!r}; "
                f"versions: {[str(v) for v in sorted(versions)]}"
            )
        return versions[version]

    def for_block(self, block: str) -> HostedModel:
        """The model answering for an attention block: the configured route, else first by name."""
        models = self.models
        if block in self._routes and self._routes[block] in models:
            return models[self._routes[block]]
        for name in sorted(models):
            if models[name].attention == block:
                return models[name]
        blocks = sorted({m.attention for m in models.values()})
        raise UnknownModel(f"no served model uses attention block {block!r}; served: {blocks}")

    def add(self, hosted: HostedModel) -> None:
        """Host `hosted` (replacing the entry of the same version, which the caller retires)."""
        self.versions.setdefault(hosted.name, {})[hosted.version] = hosted

    async def load_all(
        self, worker: DeviceWorker, pool: Executor, settings: Settings, metrics: Metrics | None
    ) -> None:
        """Load, warm up and start every pending version in turn; a failure marks only it."""
        for hosted in self.hosted():
            if hosted.status == "pending":
                await self.bring_up(hosted, worker, pool, settings, metrics)

    async def bring_up(
        self,
        hosted: HostedModel,
        worker: DeviceWorker,
        pool: Executor,
        settings: Settings,
        metrics: Metrics | None,
    ) -> bool:
        """Load, warm up and start one version; False (and the reason kept) if that fails."""
        try:
            await self._bring_up(hosted, worker, pool, settings, metrics)
        except Exception as exc:
            hosted.status, hosted.error = "failed", failure_reason(exc)
            logger.exception("model %s version %d failed to load", hosted.name, hosted.version)
            return False
        return True

    async def _bring_up(
        self,
        hosted: HostedModel,
        worker: DeviceWorker,
        pool: Executor,
        settings: Settings,
        metrics: Metrics | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        own = hosted.source.config
        max_batch_size = own.max_batch_size or settings.max_batch_size
        sizes = warmup_sizes(worker.device, max_batch_size)
        hosted.status = "loading"
        started = loop.time()
        model = await loop.run_in_executor(pool, hosted.source.build)
        runner = await worker.run(
            ModelRunner,
            hosted.name,
            model,
            device=worker.device,
            autocast=own.autocast or settings.autocast,
            channels_last=settings.channels_last,
            trace=settings.trace_models,
        )
        await worker.run(runner.warmup, sizes)
        hosted.map_counts = await worker.run(map_counts, runner)
        hosted.sites = [
            {"site": s.site, "block": s.block, "kinds": list(s.kinds)}
            for s in list_sites(runner.model, derived=True)
        ]
        hosted.config = cast(DataConfig, runner.model.data_config)
        delay_ms = (
            settings.max_batch_delay_ms
            if own.max_batch_delay_ms is None
            else own.max_batch_delay_ms
        )
        hosted.batcher = Batcher(
            hosted.name,
            functools.partial(worker.run, run_batch, runner),
            max_batch_size=max_batch_size,
            max_batch_delay_s=delay_ms / 1000.0,
            max_queue_size=own.max_queue_size or settings.max_queue_size,
            observer=metrics.observer(hosted.version) if metrics is not None else None,
            max_concurrent_batches=own.instances or worker.instances,
        )
        hosted.batcher.start()
        hosted.status = "ready"
        logger.info(
            "model %s version %d ready on %s (warm-up sizes %s) in %.2fs",
            hosted.name,
            hosted.version,
            worker.device,
            sizes,
            loop.time() - started,
        )

    async def retire(self, hosted: HostedModel, timeout: float) -> None:
        """Unload one version: refuse new requests (503 while it drains), let the admitted ones
        finish (up to `timeout` seconds), stop its batcher and drop it, releasing the weights."""
        hosted.status = "unloading"
        if not await hosted.drained(timeout):
            logger.warning(
                "model %s version %d: unload drain timed out", hosted.name, hosted.version
            )
        if hosted.batcher is not None:
            await hosted.batcher.stop(drain=True, timeout=timeout)
        hosted.status, hosted.batcher = "stopped", None
        versions = self.versions.get(hosted.name, {})
        if versions.get(hosted.version) is hosted:
            del versions[hosted.version]
            if not versions:
                del self.versions[hosted.name]
        logger.info("model %s version %d unloaded", hosted.name, hosted.version)

    async def stop(self, timeout: float) -> None:
        """Stop intake on every batcher and let each drain its queue (up to `timeout` seconds)."""
        hosted = self.hosted()
        batchers = [m.batcher for m in hosted if m.batcher is not None]
        await asyncio.gather(*(b.stop(drain=True, timeout=timeout) for b in batchers))
        for model in hosted:
            if model.status == "ready":
                model.status = "stopped"


def _default(versions: dict[int, HostedModel]) -> HostedModel:
    """The highest ready version, else the highest one (whose status says why it cannot serve)."""
    ready = [v for v, m in versions.items() if m.status == "ready"]
    return versions[max(ready or versions)]
