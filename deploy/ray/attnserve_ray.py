"""attnserve as a Ray Serve application: every replica runs the whole FastAPI app.

Each replica builds the app with `service.app.create_app` inside its own actor, so it has its
own device worker, batchers and model registry, exactly as one `attnserve serve` process. Ray
Serve's HTTP proxy spreads requests over the replicas and its autoscaler sizes them on the
requests in flight per replica (serve_config.yaml). A replica counts as started only once its
models are loaded and warm (the app's readiness), and Ray's health check asks the same
readiness, so a replica whose models fail is replaced. Every answer names its replica in the
`x-attnserve-replica` header (the replica ID and the actor's process ID).

    serve run deploy/ray/serve_config.yaml        # from the repository root (see the config)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.app import create_app
from service.settings import Settings

__all__ = ["REPLICA_HEADER", "AttnServe", "ReplicaHeader", "build"]

REPLICA_HEADER = "x-attnserve-replica"
STARTUP_TIMEOUT_S = 600.0
"""How long a replica may take to load its models before its start counts as failed."""


class ReplicaHeader:
    """ASGI wrapper that adds `x-attnserve-replica: <replica id> <pid>` to every HTTP answer."""

    def __init__(self, app: ASGIApp, value: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), value.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


def _wait_ready_on_startup(app: FastAPI, started: asyncio.Event) -> None:
    """Make the app's lifespan startup end only once the app is ready (or fail after a while),
    then set `started`."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with inner(app) as state:
            services = app.state.services
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            ready, reason = await services.readiness()
            while not ready:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready after {STARTUP_TIMEOUT_S:.0f} s: {reason}")
                await asyncio.sleep(0.2)
                ready, reason = await services.readiness()
            started.set()
            yield state

    app.router.lifespan_context = lifespan


@serve.deployment(name="attnserve")
@serve.ingress()
class AttnServe:
    """One replica: attnserve's app built from `settings` (Settings fields; ATTNSERVE_*
    environment variables of the replica fill in the rest)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings(**settings)
        self.served: FastAPI | None = None
        self.started = asyncio.Event()

    def __serve_build_asgi_app__(self) -> ASGIApp:
        app = create_app(self.settings)
        _wait_ready_on_startup(app, self.started)
        self.served = app
        replica = serve.get_replica_context().replica_id.unique_id
        return ReplicaHeader(app, f"{replica} {os.getpid()}")

    async def check_health(self) -> None:
        """Ray's periodic health check: the app's own readiness, once it has started."""
        if self.served is None or not self.started.is_set():
            return
        ready, reason = await self.served.state.services.readiness()
        if not ready:
            raise RuntimeError(f"attnserve replica not ready: {reason}")


def build(args: dict[str, Any]) -> Application:
    """The application builder that serve_config.yaml names: `args.settings` go to every
    replica's Settings."""
    return AttnServe.bind(dict(args.get("settings") or {}))
