"""The request flow's asyncio helpers (the disconnect watch, gather_all), and where the pipeline
runs its CPU work: small work on the event loop, the rest in the CPU pool."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from inprocess import serve
from PIL import Image

from models import DataConfig
from service.api.requests import until_disconnect
from service.budget import ResultCost
from service.errors import ClientDisconnected, PayloadTooLarge
from service.maps import MapRequest
from service.observe import request_scope
from service.pipeline import Pipeline, gather_all, prepare_items
from service.settings import Settings


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


class CountingPool(ThreadPoolExecutor):
    """A real one-thread pool that counts the work handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.calls = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.calls += 1
        return super().submit(fn, *args, **kwargs)

    @staticmethod
    def counting(pool: Any) -> Any:
        """Count the work handed to an existing pool (its `submit` wrapped in place)."""
        submit = pool.submit

        def counted(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
            pool.calls += 1
            return submit(fn, *args, **kwargs)

        pool.calls = 0
        pool.submit = counted
        return pool


CONFIG = DataConfig(input_size=(1, 64, 64), mean=(0.5,), std=(0.25,))
MAPS = MapRequest("summary", 16)


def noisy_png(width: int, height: int) -> bytes:
    """A grey PNG of random pixels (seeded): a few KB at 64x64."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def flat_png(width: int, height: int) -> bytes:
    """A one-colour PNG: few bytes, many pixels."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("image", "inline_max_bytes", "pool_calls"),
    [
        (noisy_png(64, 64), 64 * 1024, 0),  # small in bytes and pixels: on the loop
        (noisy_png(64, 64), 0, 1),  # inline work turned off
        (noisy_png(64, 64), 1024, 1),  # more bytes than the setting allows
        (flat_png(300, 300), 64 * 1024, 1),  # few bytes, more pixels than INLINE_MAX_PIXELS
    ],
)
async def test_the_pipeline_decodes_small_images_on_the_loop_and_the_rest_in_the_pool(
    image: bytes, inline_max_bytes: int, pool_calls: int
) -> None:
    pool = CountingPool()
    pipeline = Pipeline(
        pool,
        max_image_pixels=10**6,
        max_images=4,
        request_timeout_s=10,
        inline_max_bytes=inline_max_bytes,
    )
    with pool:
        items = await pipeline.prepare(image, [CONFIG], MAPS)
    assert pool.calls == pool_calls
    (expected,) = prepare_items(image, [CONFIG], MAPS, max_pixels=10**6)
    assert torch.equal(items[0].tensor, expected.tensor)
    assert items[0].geometry == expected.geometry


async def test_an_image_over_the_pixel_limit_is_refused_with_the_limit_not_the_inline_bound() -> (
    None
):
    pool = CountingPool()
    pipeline = Pipeline(
        pool,
        max_image_pixels=200 * 200,
        max_images=4,
        request_timeout_s=10,
        inline_max_bytes=1 << 16,
    )
    with pool, pytest.raises(PayloadTooLarge, match="limit of 40000"):
        await pipeline.prepare(flat_png(300, 300), [CONFIG], MAPS)
    assert pool.calls == 1  # refused on the loop by the inline bound, then by the limit


@pytest.mark.parametrize(("answer_bytes", "pool_calls"), [(40_000, 0), (200_000, 1)])
async def test_the_pipeline_encodes_an_answer_on_the_loop_when_its_size_bound_is_small(
    answer_bytes: int, pool_calls: int
) -> None:
    pool = CountingPool()
    pipeline = Pipeline(
        pool, max_image_pixels=10**6, max_images=4, request_timeout_s=10, inline_max_bytes=1 << 16
    )
    with pool, request_scope(10.0):
        pipeline.check_budget([ResultCost(cells=10, answer_bytes=answer_bytes)], images=1)
        assert await pipeline.encode(str.upper, "answer") == "ANSWER"
    assert pool.calls == pool_calls


async def test_a_requests_only_image_is_decoded_on_the_loop_and_several_in_the_pool(
    model_repository: Path, digits: list[tuple[int, bytes]]
) -> None:
    """Through the real app: one small image skips the pool (its answer too); the several
    images of one request are decoded side by side in the pool, not one after another on the
    loop."""
    settings = Settings(model_repository=model_repository, models=["tiny-se"])
    async with serve(settings) as served:
        pool = CountingPool.counting(served.services.pool)
        url = "/v1/models/tiny-se/predict"
        one = await served.client.post(url, files=[("images", digits[0][1])])
        assert one.status_code == 200, one.text
        assert pool.calls == 0
        files = [("images", d) for _, d in digits[:2]]
        two = await served.client.post(url, params={"maps": "none"}, files=files)
        assert two.status_code == 200, two.text
        assert len(two.json()["results"]) == 2
        assert pool.calls == 2  # one decode each; the small answer is encoded on the loop
