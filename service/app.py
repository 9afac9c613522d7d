"""`create_app(settings)`: the FastAPI application and its lifespan.

Building the app only validates the configuration (settings, device, which models to serve);
the lifespan starts the worker and loads the models in the background so that /health/live
answers at once, and on shutdown stops intake, drains the batchers and closes the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import api_router, fast_routes
from service.api.handlers import ORJSONResponse, install_handlers
from service.api.v1 import MODEL_SCOPE_KEY
from service.metrics import Metrics
from service.registry import ConfigError, discover
from service.settings import Settings
from service.state import Services
from service.worker import resolve_device

__all__ = ["AttnServe", "ConfigError", "create_app"]

logger = logging.getLogger(__name__)


class RequestMetricsMiddleware:
    """Counts every HTTP request by model, route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            model = str(scope.get(MODEL_SCOPE_KEY, ""))
            self.metrics.observe_request(model, route, status, time.perf_counter() - started)


# FastAPI's native OpenTelemetry checks the global providers (and the environment) on every
# request even when none is configured: about 5 % of the event loop's time at c=64 (py-spy).
_NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


class AttnServe(FastAPI):
    """The FastAPI app, with the inference routes served ahead of its middleware stack.

    FastAPI runs every request through about ten ASGI layers (telemetry, error handling, body
    limit, exception mapping, exit stack, routing, request/response wrappers) before the route
    and again on each message sent back: at c=64 the layers above the route took more of the
    event loop than the inference code itself (README "Benchmarks"). A POST matching one of
    `fast_routes` (v1 predict, v2 infer) is served here directly: the request metrics, the
    route's endpoint, and on an exception the app's handler for it (the same JSON error body
    as anywhere else). Everything else, and those paths with other methods, goes through
    FastAPI; its routes of the same paths stay for the OpenAPI document.
    """

    def __init__(self, *, fast_routes: list[Route], metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fast_routes = fast_routes
        self._fast = RequestMetricsMiddleware(self._serve_fast, metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for route in self._fast_routes:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child_scope)
                    scope["app"] = self
                    await self._fast(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    async def _serve_fast(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await scope["route"].endpoint(request)
        except Exception as exc:
            response = await self._error_response(request, exc)
        await response(scope, receive, send)

    async def _error_response(self, request: Request, exc: Exception) -> Response:
        """The response of the handler registered for the nearest class of `exc` (the app
        registers one for Exception itself, see handlers.install_handlers)."""
        for cls in type(exc).__mro__:
            handler = self.exception_handlers.get(cls)
            if handler is not None:
                return await handler(request, exc)  # type: ignore[no-any-return]
        raise exc


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the services (models load in the background); stop and drain them on exit."""
    services: Services = app.state.services
    await services.start()
    try:
        yield
    finally:
        await services.stop()


def _device(settings: Settings) -> torch.device:
    """The serving device, checked against the autocast setting."""
    try:
        device = resolve_device(settings.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if settings.autocast == "fp16" and device.type != "cuda":
        raise ConfigError(f"autocast 'fp16' needs a CUDA device, but the device is {device}")
    return device


def _version() -> str:
    try:
        return version("attnserve")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application for `settings` (read from ATTNSERVE_* when None); ConfigError if unusable."""
    settings = settings if settings is not None else Settings()
    sources = discover(settings)
    services = Services(settings, sources, _device(settings))
    app = AttnServe(
        fast_routes=fast_routes,
        metrics=services.metrics,
        title="attnserve",
        version=_version(),
        summary="CNN image classifiers with attention blocks: predictions plus attention maps.",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
        telemetry=None if settings.opentelemetry else _NO_TELEMETRY,
    )
    app.state.services = services
    install_handlers(app)
    app.include_router(api_router)
    app.add_middleware(RequestMetricsMiddleware, metrics=services.metrics)
    logger.info(
        "serving %d model(s) on %s: %s", len(sources), services.device, [s.name for s in sources]
    )
    return app
