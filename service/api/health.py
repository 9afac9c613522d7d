"""Health and metrics: liveness answers at once, readiness reflects the real state."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.handlers import ORJSONResponse
from service.api.schemas import NotReadyResponse, ReadyResponse
from service.errors import BatcherStopped, NotReady
from service.metrics import CONTENT_TYPE
from service.state import ServicesDep

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="Liveness", response_class=ORJSONResponse)
async def live() -> ORJSONResponse:
    """The process answers HTTP (models may still be loading)."""
    return ORJSONResponse({"status": "alive"})


@router.get(
    "/health/ready",
    summary="Readiness",
    response_class=ORJSONResponse,
    response_model=ReadyResponse,
    responses={503: {"model": NotReadyResponse, "description": "Not ready, with the reason."}},
)
async def ready(services: ServicesDep) -> ORJSONResponse:
    """200 once the models are loaded and warm (all, or any with ATTNSERVE_READINESS=any) and
    the device worker answers; else 503 + reason (`shutting_down` from the first exit signal)."""
    is_ready, reason = await services.readiness()
    models = services.model_states()
    if is_ready:
        return ORJSONResponse({"status": "ready", "models": models})
    error = BatcherStopped.error if services.draining or services.stopping else NotReady.error
    body = {"error": error, "detail": reason, "models": models}
    return ORJSONResponse(body, status_code=NotReady.status_code)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(services: ServicesDep) -> Response:
    """Prometheus text exposition of this app's registry."""
    return Response(services.metrics_text(), media_type=CONTENT_TYPE)
