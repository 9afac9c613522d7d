"""`create_app(settings)`: the FastAPI application and its lifespan.

Building the app only validates the configuration (settings, device, which models to serve);
the lifespan starts the worker and loads the models in the background so that /health/live
answers at once, and on shutdown stops intake, drains the batchers and closes the worker.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.telemetry import TelemetryConfig

from service.api import routers
from service.api.handlers import ORJSONResponse, install_handlers
from service.auth import AuthMiddleware, load_keys
from service.device import resolve_device
from service.observe import RequestMiddleware
from service.repository import ConfigError, discover
from service.runner import autocast_problem
from service.settings import Settings
from service.state import DRAIN_TIMEOUT_S, Services

__all__ = ["ConfigError", "create_app"]

logger = logging.getLogger(__name__)


# FastAPI's native OpenTelemetry looks up the global providers on every request even when
# none is configured; the setting turns it on for deployments that configure one.
_NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the services (models load in the background); stop and drain them on exit."""
    services: Services = app.state.services
    await services.start()
    grpc_server = None
    if app.state.grpc and services.settings.grpc_port:
        from service.api.grpc_server import GrpcServer  # grpcio only when gRPC is on

        grpc_server = GrpcServer(services, app.version, app.state.keys)
    try:
        if grpc_server is not None:
            await grpc_server.start()
        yield
    finally:
        if grpc_server is not None:  # HTTP has drained; now gRPC's calls, then the batchers
            await grpc_server.stop(DRAIN_TIMEOUT_S)
        await services.stop()


def _device(settings: Settings) -> torch.device:
    """The serving device, checked against the autocast setting."""
    try:
        device = resolve_device(settings.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    problem = autocast_problem(device, settings.autocast)
    if problem is not None:
        raise ConfigError(problem)
    return device


def _version() -> str:
    try:
        return version("attnserve")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(settings: Settings | None = None, *, grpc: bool = False) -> FastAPI:
    """The application for `settings` (read from ATTNSERVE_* when None); ConfigError if unusable.
    `grpc`: the lifespan also serves gRPC on `grpc_port` (the server does; in-process uses
    open no port)."""
    settings = settings if settings is not None else Settings()
    sources = discover(settings)
    services = Services(settings, sources, _device(settings))
    app = FastAPI(
        title="attnserve",
        version=_version(),
        summary="CNN image classifiers with attention blocks: predictions plus attention maps.",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
        telemetry=None if settings.opentelemetry else _NO_TELEMETRY,
    )
    app.state.services = services
    app.state.grpc = grpc
    install_handlers(app)
    for router in routers:
        app.include_router(router)
    app.state.keys = load_keys(settings)  # None: authentication is off
    if app.state.keys is not None:
        app.add_middleware(AuthMiddleware, keys=app.state.keys, settings=settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["x-request-id", "retry-after"],
        )
    # Outermost (added last): every answer, errors of the other middleware included, gets the
    # request ID, and is counted and logged once.
    app.add_middleware(
        RequestMiddleware,
        metrics=services.metrics,
        timeout_s=settings.request_timeout_s,
        tracing=settings.opentelemetry,
    )
    logger.info(
        "serving %d model(s) on %s: %s", len(sources), services.device, [s.name for s in sources]
    )
    return app
