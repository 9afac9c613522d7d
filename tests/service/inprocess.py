"""Run a real app (lifespan, loading, batchers, device worker) in-process behind an httpx client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from service.app import create_app
from service.settings import Settings
from service.state import Services


@dataclass
class Served:
    app: FastAPI
    client: httpx.AsyncClient

    @property
    def services(self) -> Services:
        return self.app.state.services

    async def infer(self, model: str, request: dict[str, Any], **kw: Any) -> httpx.Response:
        """POST a v2 inference request as JSON."""
        return await self.client.post(f"/v2/models/{model}/infer", json=request, **kw)


@contextlib.asynccontextmanager
async def serve(settings: Settings, *, ready: bool = True) -> AsyncIterator[Served]:
    """Run an app's lifespan and a client for it; wait until every model has loaded."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://attnserve") as client:
            served = Served(app, client)
            if ready:
                await wait_loaded(served)
            yield served


async def wait_loaded(served: Served, timeout: float = 60.0) -> None:
    """Wait until every configured model has finished loading."""
    registry = served.services.registry
    async with asyncio.timeout(timeout):
        while registry.loaded < len(registry.models):
            await asyncio.sleep(0.02)
