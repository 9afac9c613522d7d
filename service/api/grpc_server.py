"""The gRPC server of one app: grpcio's asyncio server on the app's event loop, beside uvicorn.

It carries the inference service (`grpc_service`) and the standard health checking service
(grpc.health.v1), whose status for "" and for the inference service follows the readiness of
/health/ready. It takes messages up to `max_body_bytes`, as HTTP takes bodies; a larger one is
refused with RESOURCE_EXHAUSTED. Stopping refuses new calls and lets running ones finish.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from tritonclient.grpc import service_pb2_grpc

from service.api.grpc_service import SERVICE, InferenceServicer
from service.auth import KeyRing
from service.state import Services

__all__ = ["GrpcServer"]

logger = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Health(HealthServicer):
    """grpc.health.v1 with the service's readiness: checked on every Check, and published to
    Watch streams when it changes."""

    def __init__(self, services: Services) -> None:
        super().__init__()
        self._services = services

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        if request.service in ("", SERVICE):
            ready, _ = await self._services.readiness()
            await self.set(request.service, _SERVING if ready else _NOT_SERVING)
        return await super().Check(request, context)


class GrpcServer:
    """The inference and health services on `host:port`; `start` binds, `stop` drains."""

    def __init__(self, services: Services, version: str, keys: KeyRing | None = None) -> None:
        settings = services.settings
        self.address = f"{settings.host}:{settings.grpc_port}"
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ]
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(services, version, keys), self.server
        )
        self.health = _Health(services)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    async def start(self) -> None:
        """Bind the port and start serving (OSError naming the address if it is taken)."""
        try:
            bound = self.server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {self.address}: {exc}") from None
        if bound == 0:
            raise OSError(f"cannot listen for gRPC on {self.address}")
        await self.server.start()
        logger.info("gRPC inference service on %s", self.address)

    async def stop(self, grace: float) -> None:
        """Health turns NOT_SERVING, new calls are refused, running ones get `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        logger.info("gRPC service stopped")
