"""The running service: settings, metrics, models, device worker and CPU pool of one app.

`create_app` builds a `Services`; the lifespan starts it (worker, pool, background loading) and
stops it (intake off, batchers drained, worker closed). Routes reach it through `ServicesDep`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import torch
from fastapi import Depends, Request

from service.control import ModelControl
from service.device import DeviceWorker, default_instances
from service.errors import BatcherStopped, NotReady
from service.hosting import HostedModel, ModelRegistry
from service.metrics import Metrics
from service.observe import request_scope
from service.pipeline import Pipeline
from service.repository import ModelSource
from service.settings import Settings
from service.tuning import keep_freed_memory

__all__ = ["DRAIN_TIMEOUT_S", "Services", "ServicesDep", "get_services"]

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 10.0


class Services:
    """Everything the routes need, with its lifecycle: created -> running -> stopped."""

    def __init__(self, settings: Settings, sources: list[ModelSource], device: torch.device):
        self.settings = settings
        self.device = device
        self.metrics = Metrics()
        self.registry = ModelRegistry(sources, settings.block_routes)
        self.worker: DeviceWorker | None = None
        self.pool: ThreadPoolExecutor | None = None
        self._pipeline: Pipeline | None = None
        self._loader: asyncio.Task[None] | None = None
        self.control: ModelControl | None = None
        self.accepting = False
        self.stopping = False
        self.draining = False  # set on the first exit signal: not ready, still serving
        self.ready_check_timeout_s = 5.0

    async def start(self) -> None:
        """Start the device worker and the CPU pool, then load the models in the background."""
        if self.device.type == "cpu" and self.settings.malloc_keep_freed:
            keep_freed_memory()
        instances = self.settings.instances or default_instances(self.device)
        self.worker = DeviceWorker(self.device, instances=instances)
        self.pool = ThreadPoolExecutor(
            self.settings.cpu_threads, thread_name_prefix="attnserve-cpu"
        )
        self._pipeline = Pipeline(
            self.pool,
            max_image_pixels=self.settings.max_image_pixels,
            max_images=self.settings.max_images_per_request,
            request_timeout_s=self.settings.request_timeout_s,
            max_map_cells=self.settings.max_map_cells,
            max_answer_bytes=self.settings.max_response_bytes,
            inline_max_bytes=self.settings.inline_max_bytes,
        )
        self.accepting = True
        self.control = ModelControl(
            self.registry, self.worker, self.pool, self.settings, self.metrics, DRAIN_TIMEOUT_S
        )
        self._loader = asyncio.get_running_loop().create_task(
            self.control.start(), name="attnserve-load-models"
        )

    async def stop(self) -> None:
        """Refuse new requests, drain every batcher, then close the worker and the pool."""
        self.accepting, self.stopping = False, True
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        await self.registry.stop(timeout=DRAIN_TIMEOUT_S)
        if self._pipeline is not None and not await self._pipeline.wait_idle(DRAIN_TIMEOUT_S):
            logger.warning("requests still in flight after %ss; stopping anyway", DRAIN_TIMEOUT_S)
        if self.worker is not None:
            await asyncio.to_thread(self.worker.close)
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        logger.info("attnserve stopped")

    def check_accepting(self) -> None:
        """503 before start-up and while shutting down."""
        if self.stopping:
            raise BatcherStopped("the service is shutting down")
        if self._pipeline is None or not self.accepting:
            raise NotReady("the service is starting")

    @property
    def pipeline(self) -> Pipeline:
        """The prediction pipeline, if requests are accepted."""
        self.check_accepting()
        if self._pipeline is None:
            raise NotReady("the service is starting")
        return self._pipeline

    def ready_model(self, hosted: HostedModel) -> HostedModel:
        """`hosted` if it can take requests now; 503 with the reason otherwise."""
        self.check_accepting()
        if hosted.status != "ready":
            reason = f": {hosted.error}" if hosted.error else ""
            progress = f" ({self.registry.loaded}/{len(self.registry.models)} models loaded)"
            raise NotReady(f"model {hosted.name!r} is {hosted.status}{reason}{progress}")
        return hosted

    @contextlib.contextmanager
    def serving(self, hosted: HostedModel) -> Iterator[Pipeline]:
        """One inference request on `hosted`: 503 unless it is ready; while it runs it counts
        as in flight (shutdown and unloading wait for it); its outcome and phases are measured."""
        self.ready_model(hosted)
        pipeline = self.pipeline
        ok = False
        with request_scope(self.settings.request_timeout_s) as request:
            try:
                with pipeline.tracked(), hosted.in_use():
                    yield pipeline
                    ok = True
            finally:
                self.metrics.observe_inference(hosted.name, hosted.version, ok, request)

    async def readiness(self) -> tuple[bool, str]:
        """(ready, reason). Policy "all": every model loaded and warm with a live batcher;
        "any": at least one such model. Either way the worker must answer, and a draining or
        stopping service is not ready."""
        if self.draining or self.stopping:
            return False, "shutting down"
        if not self.accepting or self.worker is None:
            return False, "starting"
        problems = [p for p in map(self._model_problem, self.registry.models.values()) if p]
        if self.settings.readiness == "any":
            if len(problems) == len(self.registry.models):
                return False, "no model is ready: " + "; ".join(problems)
        elif self.registry.loaded < len(self.registry.models):
            return False, f"loading {self.registry.loaded}/{len(self.registry.models)} models"
        elif problems:
            return False, problems[0]
        try:
            async with asyncio.timeout(self.ready_check_timeout_s):
                answered = await self.worker.check()
        except TimeoutError:
            answered = False
        if not answered:
            return False, "worker not responding"
        return True, "ready"

    @staticmethod
    def _model_problem(hosted: HostedModel) -> str | None:
        """Why `hosted` cannot serve, or None when it can."""
        if hosted.status == "failed":
            return f"model {hosted.name} failed to load: {hosted.error}"
        if hosted.status != "ready":
            return f"model {hosted.name} is {hosted.status}"
        if hosted.batcher is None or not hosted.batcher.alive:
            return f"batcher for {hosted.name} stopped"
        return None

    def model_states(self) -> dict[str, dict[str, Any]]:
        """Per-model status for the health endpoint."""
        return {
            name: {
                "status": hosted.status,
                "error": hosted.error,
                "queue_depth": hosted.batcher.queue_depth if hosted.batcher else 0,
            }
            for name, hosted in self.registry.models.items()
        }

    def metrics_text(self) -> bytes:
        """The Prometheus exposition, with the device memory gauge refreshed (CUDA only)."""
        if self.worker is not None and self.device.type == "cuda":
            self.metrics.set_device_memory(str(self.device), self.worker.memory_bytes())
        return self.metrics.render()


async def get_services(request: Request) -> Services:
    """The app's `Services` (set by create_app).

    A coroutine on purpose: FastAPI runs a plain-function dependency in its thread pool, a
    thread hop on every request for what is one attribute lookup.
    """
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
