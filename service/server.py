"""The HTTP server process: uvicorn with a drain delay for load balancers.

On the first SIGTERM or SIGINT, readiness turns 503 (`shutting_down`) at once while the server
keeps accepting and serving for `drain_delay_s`, so that the load balancer's next probe takes the
instance out of rotation before its port closes. Then uvicorn stops accepting, finishes the open
requests (up to `GRACEFUL_SHUTDOWN_S`) and the lifespan drains the batchers. A second signal
during the delay stops at once.
"""

from __future__ import annotations

import logging
import time
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.connections import uvicorn_options
from service.settings import Settings
from service.state import Services

__all__ = ["GRACEFUL_SHUTDOWN_S", "DrainingServer", "serve"]

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 25
"""uvicorn's wait for open connections after the delay; with the lifespan's batcher drain
(`service.state.DRAIN_TIMEOUT_S`) and the default delay it stays inside compose's 45 s grace."""


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal starts the drain delay instead of the shutdown."""

    def __init__(self, config: uvicorn.Config, services: Services, drain_delay_s: float) -> None:
        super().__init__(config)
        self.services = services
        self.drain_delay_s = drain_delay_s
        self._pending: tuple[int, float] | None = None  # (signal, when to stop accepting)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._pending is None and self.drain_delay_s > 0 and not self.should_exit:
            # A signal handler: only plain attribute writes here; on_tick does the rest.
            self.services.draining = True
            self._pending = (sig, time.monotonic() + self.drain_delay_s)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        pending = self._pending
        if pending is not None and not self.should_exit:
            sig, stop_at = pending
            if counter % 10 == 0:
                left = max(0.0, stop_at - time.monotonic())
                logger.info("draining: not ready, still serving for %.1fs", left)
            if time.monotonic() >= stop_at:
                super().handle_exit(sig, None)
        return await super().on_tick(counter)


def serve(app: FastAPI, settings: Settings, **options: Any) -> None:
    """Run `app` until a signal, then drain (see the module docstring)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        log_config=None,  # the process's logging (service.observe.configure_logging) applies
        access_log=False,  # service.observe.RequestMiddleware writes the access log
        **uvicorn_options(settings),
        **options,
    )
    services: Services = app.state.services
    DrainingServer(config, services, settings.drain_delay_s).run()
