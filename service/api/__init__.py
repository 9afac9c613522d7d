"""HTTP layer: one router per concern, errors mapped in `handlers`."""

from __future__ import annotations

from service.api import health, v1, v2, v2_repository, viewer

__all__ = ["routers"]

routers = [
    v1.router,
    v2_repository.router,  # /v2/models/stats before /v2/models/{name}
    v2.router,
    health.router,
    viewer.router,
]
"""Every router, in matching order; the app includes each directly (no nested router level)."""
