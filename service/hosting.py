"""The hosted models and their lifecycle: pending -> loading -> ready (or failed) -> stopped.

Loading and warm-up run after the service starts listening, one model at a time, and each model
reports its own status; a ready model has a batcher whose handler runs on the device worker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from models import DataConfig, list_sites
from service.batching import Batcher, BatchObserver
from service.device import DeviceWorker
from service.errors import NotReady, UnknownModel
from service.forward import ImageResult, Item, run_batch
from service.repository import ModelSource
from service.runner import ModelRunner
from service.settings import Settings

__all__ = ["HostedModel", "ModelRegistry", "warmup_sizes"]

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

    async def submit(self, item: Item, timeout: float) -> ImageResult:
        """Queue one image on this model's batcher and wait for its result (NotReady at once
        until the model is loaded and warm)."""
        if self.batcher is None or self.status != "ready":
            reason = f": {self.error}" if self.error else ""
            raise NotReady(f"model {self.name!r} is {self.status}{reason}")
        return await self.batcher.submit(item, timeout=timeout)


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
            functools.partial(worker.run, run_batch, runner),
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            observer=observer,
            max_concurrent_batches=worker.instances,
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
