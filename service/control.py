"""Model control, as Triton's --model-control-mode: explicit load and unload, repository polling.

Every change brings one model's hosted versions to what its directory and version policy ask
for: new or changed versions load beside the serving ones (the package in the CPU pool, tracing
and warm-up on a device thread, so the event loop keeps serving), and only when all of them are
ready do the versions that left the policy retire. A version that fails to load is kept as
failed, with its reason, and the versions it would have replaced keep serving. Retiring a
version refuses its new requests (503), waits for the admitted ones and then drops the weights.
Changes run one at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from service.device import DeviceWorker
from service.errors import BadRequest, UnknownModel
from service.hosting import HostedModel, ModelRegistry
from service.metrics import Metrics
from service.model_config import ModelConfig, config_from_json
from service.repository import ModelDir, ModelSource, scan_repository
from service.settings import Settings
from service.tuning import settle_gc

__all__ = ["ModelControl", "index_state"]

logger = logging.getLogger(__name__)

_STATES = {
    "pending": "LOADING",
    "loading": "LOADING",
    "ready": "READY",
    "unloading": "UNLOADING",
    "failed": "UNAVAILABLE",
    "stopped": "UNAVAILABLE",
}


def index_state(hosted: HostedModel) -> dict[str, str]:
    """A hosted version as an entry of the repository index (Triton's states)."""
    reason = {"failed": f"failed to load: {hosted.error}", "stopped": "unloaded"}
    return {
        "name": hosted.name,
        "version": str(hosted.version),
        "state": _STATES[hosted.status],
        "reason": reason.get(hosted.status, hosted.error or ""),
    }


class ModelControl:
    """Loads, reloads and unloads model versions on a running registry."""

    def __init__(
        self,
        registry: ModelRegistry,
        worker: DeviceWorker,
        pool: Executor,
        settings: Settings,
        metrics: Metrics,
        drain_timeout_s: float,
    ) -> None:
        self.registry = registry
        self._worker, self._pool, self._settings, self._metrics = worker, pool, settings, metrics
        self._drain_timeout_s = drain_timeout_s
        self._repository = Path(settings.model_repository)
        self._static = {m.name for m in registry.hosted() if m.source.package is None}
        self._lock = asyncio.Lock()

    @property
    def explicit(self) -> bool:
        return self._settings.model_control_mode == "explicit"

    async def start(self) -> None:
        """Load the versions chosen at start; in poll mode, then rescan for ever."""
        async with self._lock:
            await self.registry.load_all(self._worker, self._pool, self._settings, self._metrics)
            self._settle()
        if self._settings.model_control_mode == "poll":
            while True:
                await asyncio.sleep(self._settings.repository_poll_s)
                try:
                    await self.rescan()
                except Exception:
                    logger.exception("repository poll failed")

    async def scan(self) -> dict[str, ModelDir]:
        """The repository as it is now (read in the CPU pool)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, scan_repository, self._repository)

    async def rescan(self) -> None:
        """Poll mode: apply every change of the repository (new, changed, removed versions)."""
        models = await self.scan()
        wanted = self._settings.models
        async with self._lock:
            names = (set(models) | set(self.registry.versions)) - self._static
            for name in sorted(n for n in names if not wanted or n in wanted):
                if name in models:
                    await self._apply(name, models[name].selected(), retry_failed=False)
                else:
                    await self._unload(name)

    async def load(self, name: str, config: str | None = None) -> None:
        """Explicit mode: load (or reload what changed of) model `name`, with `config` (Triton's
        JSON model config) in place of its config.json when given. BadRequest if nothing of it
        could be loaded; an earlier version then keeps serving."""
        self._check_explicit()
        models = await self.scan()
        if name not in models:
            raise UnknownModel(f"no model {name!r} in the repository; available: {sorted(models)}")
        model = models[name]
        if config is not None:
            try:
                override = config_from_json(config, name)
            except ValueError as exc:
                raise BadRequest(f"the config of model {name!r} is invalid: {exc}") from None
            model = _with_config(model, override)
        async with self._lock:
            await self._apply(name, model.selected(), retry_failed=True)
        versions = self.registry.versions.get(name, {})
        if not any(m.status == "ready" for m in versions.values()):
            reasons = "; ".join(f"version {m.version}: {m.error}" for m in versions.values())
            raise BadRequest(f"failed to load model {name!r}: {reasons or 'no version selected'}")

    async def unload(self, name: str) -> None:
        """Explicit mode: unload every version of `name`, draining its admitted requests."""
        self._check_explicit()
        async with self._lock:
            if name not in self.registry.versions:
                raise UnknownModel(f"no model {name!r} is loaded; loaded: {self.loaded_names()}")
            await self._unload(name)

    def loaded_names(self) -> list[str]:
        return sorted(self.registry.versions)

    async def index(self, ready_only: bool) -> list[dict[str, str]]:
        """Every model version in the repository or hosted, with its state and reason."""
        models = await self.scan()
        entries: dict[tuple[str, int], dict[str, str]] = {}
        for model in models.values():
            for version in model.versions:
                entries[(model.name, version)] = {
                    "name": model.name,
                    "version": str(version),
                    "state": "UNAVAILABLE",
                    "reason": "unloaded",
                }
        for hosted in self.registry.hosted():
            entries[(hosted.name, hosted.version)] = index_state(hosted)
        listed = [entries[key] for key in sorted(entries)]
        return [e for e in listed if e["state"] == "READY"] if ready_only else listed

    def _check_explicit(self) -> None:
        if not self.explicit:
            raise BadRequest(
                f"model control mode is {self._settings.model_control_mode!r}: models are "
                "loaded and unloaded through the repository API only in explicit mode. "
                "Hint: start with ATTNSERVE_MODEL_CONTROL_MODE=explicit."
            )

    async def _apply(self, name: str, wanted: list[ModelSource], *, retry_failed: bool) -> None:
        """Bring the hosted versions of `name` to `wanted` (see the module docstring)."""
        current = dict(self.registry.versions.get(name, {}))
        replaced: list[HostedModel] = []
        for source in wanted:
            old = current.get(source.version)
            unchanged = old is not None and old.source == source
            if unchanged and not (retry_failed and old is not None and old.status == "failed"):
                continue
            hosted = HostedModel(source)
            if old is None or old.status != "ready":
                self.registry.add(hosted)  # visible as loading; never a default before ready
            ok = await self.registry.bring_up(
                hosted, self._worker, self._pool, self._settings, self._metrics
            )
            if old is not None and old.status == "ready":
                if ok:
                    self.registry.add(hosted)
                    replaced.append(old)
                else:
                    old.error = f"a changed package failed to load: {hosted.error}"
            elif old is not None:
                replaced.append(old)
        versions = self.registry.versions.get(name, {})
        numbers = {s.version for s in wanted}
        all_ready = all(versions[v].status == "ready" for v in numbers if v in versions)
        for version, hosted in list(versions.items()):
            if version not in numbers and (all_ready or hosted.status != "ready"):
                replaced.append(hosted)
        await self._retire(replaced)
        self._settle()

    async def _unload(self, name: str) -> None:
        await self._retire(list(self.registry.versions.get(name, {}).values()))
        self._settle()

    def _settle(self) -> None:
        """The garbage collector after a load or unload (`service.tuning.settle_gc`)."""
        if self._settings.gc_freeze:
            settle_gc()

    async def _retire(self, hosted: list[HostedModel]) -> None:
        timeout = self._drain_timeout_s
        await asyncio.gather(*(self.registry.retire(m, timeout) for m in hosted))


def _with_config(model: ModelDir, config: ModelConfig) -> ModelDir:
    """`model` with `config` in place of its config.json (a load request's override)."""
    versions: dict[int, Any] = {
        v: dataclasses.replace(s, config=config) for v, s in model.versions.items()
    }
    return ModelDir(model.name, versions, config)
