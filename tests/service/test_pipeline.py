"""The request flow's asyncio helpers: the disconnect watch and gather_all."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.api.requests import until_disconnect
from service.errors import ClientDisconnected
from service.pipeline import gather_all


class Receive:
    """An ASGI receive callable that reports a disconnect once `disconnect` is set."""

    def __init__(self) -> None:
        self.disconnect = asyncio.Event()
        self.abandoned = False  # a pending call was cancelled

    async def __call__(self) -> dict[str, Any]:
        try:
            await self.disconnect.wait()
        except asyncio.CancelledError:
            self.abandoned = True
            raise
        return {"type": "http.disconnect"}


async def sleep_until_cancelled(cancelled: asyncio.Event) -> None:
    """Work that never finishes by itself; sets `cancelled` when it is cancelled."""
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        cancelled.set()
        raise


async def test_until_disconnect_returns_the_result_and_stops_watching() -> None:
    receive = Receive()
    assert await until_disconnect(receive, asyncio.sleep(0.01, result=42)) == 42
    await asyncio.sleep(0)
    assert receive.abandoned  # the watcher was cancelled with the answer


async def test_until_disconnect_cancels_the_work_when_the_client_goes_away() -> None:
    receive = Receive()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> int:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    async def go_away() -> None:
        await started.wait()
        receive.disconnect.set()

    helper = asyncio.ensure_future(go_away())
    with pytest.raises(ClientDisconnected):
        await until_disconnect(receive, work())
    await helper
    assert cancelled.is_set()


async def test_until_disconnect_cancels_a_bare_future_when_the_client_goes_away() -> None:
    """A future (a batcher's `enqueue`) is awaited as it is, and cancelled on a disconnect."""
    receive = Receive()
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(until_disconnect(receive, future))
    await asyncio.sleep(0)
    receive.disconnect.set()
    with pytest.raises(ClientDisconnected):
        await waiting
    assert future.cancelled()
    other: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(other.set_result, 7)
    assert await until_disconnect(Receive(), other) == 7


async def test_until_disconnect_passes_on_its_own_cancellation() -> None:
    receive = Receive()
    work_cancelled = asyncio.Event()
    outer = asyncio.ensure_future(until_disconnect(receive, sleep_until_cancelled(work_cancelled)))
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert work_cancelled.is_set()


async def test_until_disconnect_keeps_the_works_own_error() -> None:
    async def work() -> None:
        raise ValueError("bad image")

    with pytest.raises(ValueError, match="bad image"):
        await until_disconnect(Receive(), work())


async def test_gather_all_cancels_the_others_on_the_first_failure() -> None:
    cancelled = asyncio.Event()

    async def fail() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await gather_all([sleep_until_cancelled(cancelled), fail()])
    await asyncio.sleep(0)
    assert cancelled.is_set()
    assert await gather_all([asyncio.sleep(0, result=1), asyncio.sleep(0, result=2)]) == [1, 2]
