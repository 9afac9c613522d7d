"""The inference routes as plain Starlette routes, served ahead of FastAPI's middleware stack.

FastAPI's per-request handling (parameter solving, response processing) and the ASGI layers
around every route took more of the event loop's time at c=64 than the route's own code
(py-spy, README "Benchmarks"). The busiest routes (v1 predict, v2 infer) are therefore plain
routes that `service.app.AttnServe` matches and serves itself, with the same request metrics
and the same exception handlers; the FastAPI routes of the same paths stay for the OpenAPI
document.
"""

from __future__ import annotations

from starlette.routing import Match, Route
from starlette.types import Scope

__all__ = ["PlainRoute"]


class PlainRoute(Route):
    """A Starlette route that puts itself in the scope as FastAPI's routes do (the request
    metrics label requests by `scope["route"].path`)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match != Match.NONE:
            child_scope["route"] = self
        return match, child_scope
