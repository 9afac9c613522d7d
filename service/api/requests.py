"""What every HTTP adapter shares about a request: the model label for the request metrics and
the watch that cancels work when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from service.errors import ClientDisconnected
from service.observe import MODEL_SCOPE_KEY

__all__ = ["MODEL_SCOPE_KEY", "until_disconnect"]

V = TypeVar("V")
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


async def _cancel_on_disconnect(receive: Receive, work: asyncio.Future[Any]) -> None:
    """Cancel `work` once the ASGI server reports that the client went away."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            work.cancel()
            return


async def until_disconnect(receive: Receive, work: Awaitable[V]) -> V:
    """Await `work`, cancelling it (and raising ClientDisconnected) if the client disconnects:
    queued items of a cancelled request are dropped before they reach the device."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, task))
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled() and watcher.exception() is None:
            raise ClientDisconnected(
                "the client disconnected before the answer was ready"
            ) from None
        raise
    finally:
        watcher.cancel()
