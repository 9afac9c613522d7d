"""HTTP layer: one router per concern, errors mapped in `handlers`."""

from __future__ import annotations

from fastapi import APIRouter

from service.api import health, v1, v2, v2_repository, viewer

__all__ = ["api_router"]

api_router = APIRouter()
api_router.include_router(v1.router)
api_router.include_router(v2_repository.router)  # /v2/models/stats before /v2/models/{name}
api_router.include_router(v2.router)
api_router.include_router(health.router)
api_router.include_router(viewer.router)
