"""Dynamic batcher behaviour with plain asyncio: batch composition, limits, failures, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from service.batching import Batcher
from service.errors import BatcherStopped, DeadlineExceeded, NotReady, QueueFull


class Handler:
    """Records every batch; `gate` holds a batch inside the handler until the test releases it."""

    def __init__(self, fn: Callable[[Any], Any] = lambda x: x * 10) -> None:
        self.fn = fn
        self.batches: list[list[Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.entered.set()
        await self.gate.wait()
        return [self.fn(x) for x in items]

    async def hold_first(self, batcher: Batcher[Any, Any], item: Any) -> asyncio.Task[Any]:
        """Submit `item` and wait until its batch sits in the handler (which is then blocked)."""
        self.gate.clear()
        task = asyncio.create_task(batcher.submit(item))
        await asyncio.wait_for(self.entered.wait(), 1.0)
        return task


class Observer:
    def __init__(self) -> None:
        self.batches: list[tuple[str, int, list[float], float]] = []
        self.depths: list[int] = []

    def on_batch(self, name: str, size: int, queue_waits: list[float], run_seconds: float) -> None:
        self.batches.append((name, size, queue_waits, run_seconds))

    def on_queue_depth(self, name: str, depth: int) -> None:
        self.depths.append(depth)


async def until(condition: Callable[[], bool], timeout: float = 1.0) -> None:
    """Yield to the loop until `condition` holds (fails the test after `timeout`)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.001)


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Batcher[Any, Any]]]:
    """Build and start batchers; stop every one of them after the test."""
    made: list[Batcher[Any, Any]] = []

    def factory(handler: Any, **kwargs: Any) -> Batcher[Any, Any]:
        batcher: Batcher[Any, Any] = Batcher("m", handler, **kwargs)
        batcher.start()
        made.append(batcher)
        return batcher

    yield factory
    for batcher in made:
        await batcher.stop(drain=False, timeout=1.0)


async def test_fills_to_max_batch_size_when_many_are_queued(make) -> None:
    handler = Handler()
    batcher = make(handler, max_batch_size=4)
    first = await handler.hold_first(batcher, 0)
    rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 10)]
    await until(lambda: batcher.queue_depth == 9)
    handler.gate.set()
    assert await first == 0
    assert await asyncio.gather(*rest) == [i * 10 for i in range(1, 10)]
    assert handler.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]


async def test_lone_request_goes_straight_through_without_delay(make) -> None:
    handler = Handler()
    batcher = make(handler, max_batch_size=32, max_batch_delay_s=0.0)
    assert await batcher.submit(7) == 70
    assert handler.batches == [[7]]


async def test_full_batch_does_not_wait_for_the_delay(make) -> None:
    handler = Handler()
    batcher = make(handler, max_batch_size=2, max_batch_delay_s=5.0)
    start = time.monotonic()
    assert await asyncio.gather(batcher.submit(1), batcher.submit(2)) == [10, 20]
    assert time.monotonic() - start < 0.5
    assert handler.batches == [[1, 2]]


async def test_max_batch_delay_gathers_late_arrivals(make) -> None:
    handler = Handler()
    batcher = make(handler, max_batch_size=8, max_batch_delay_s=0.3)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.02)
    late = [asyncio.create_task(batcher.submit(i)) for i in (2, 3)]
    assert await first == 10
    assert await asyncio.gather(*late) == [20, 30]
    assert handler.batches == [[1, 2, 3]]


async def test_queue_full_raises_at_once(make) -> None:
    handler = Handler()
    batcher = make(handler, max_batch_size=1, max_queue_size=2)
    running = await handler.hold_first(batcher, 0)
    queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    await until(lambda: batcher.queue_depth == 2)
    start = time.monotonic()
    with pytest.raises(QueueFull) as info:
        await batcher.submit(3)
    assert time.monotonic() - start < 0.5
    assert info.value.retry_after >= 1
    assert info.value.headers["Retry-After"] == str(info.value.retry_after)
    handler.gate.set()
    assert [await running, *await asyncio.gather(*queued)] == [0, 10, 20]
    assert [3] not in handler.batches


async def test_deadline_in_queue_raises_and_item_never_runs(make) -> None:
    handler = Handler()
    batcher = make(handler)
    running = await handler.hold_first(batcher, 0)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(1, timeout=0.05)
    handler.gate.set()
    assert await running == 0
    assert await batcher.submit(2, timeout=1.0) == 20
    assert handler.batches == [[0], [2]]


async def test_deadline_while_running_leaves_loop_healthy(make) -> None:
    handler = Handler()
    batcher = make(handler)
    handler.gate.clear()
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(1, timeout=0.05)
    handler.gate.set()
    assert await batcher.submit(2) == 20
    assert batcher.alive


async def test_cancelled_item_is_dropped_before_handler(make) -> None:
    handler = Handler()
    batcher = make(handler)
    running = await handler.hold_first(batcher, 0)
    gone = asyncio.create_task(batcher.submit(1))
    kept = asyncio.create_task(batcher.submit(2))
    await until(lambda: batcher.queue_depth == 2)
    gone.cancel()
    handler.gate.set()
    assert await running == 0
    assert await kept == 20
    assert gone.cancelled()
    assert handler.batches == [[0], [2]]


async def test_handler_error_fails_whole_batch_then_recovers(make) -> None:
    def fn(x: int) -> int:
        if x == 2:
            raise ValueError("bad item 2")
        return x

    handler = Handler(fn)
    batcher = make(handler)
    running = await handler.hold_first(batcher, 0)
    batch = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
    await until(lambda: batcher.queue_depth == 3)
    handler.gate.set()
    assert await running == 0
    results = await asyncio.gather(*batch, return_exceptions=True)
    assert all(isinstance(r, ValueError) and "bad item 2" in str(r) for r in results)
    assert await batcher.submit(5) == 5
    assert batcher.alive


async def test_output_count_mismatch_fails_every_item(make) -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    batcher = make(short)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert "results for" in str(results[0])
    assert batcher.alive


async def test_exception_result_fails_only_that_item(make) -> None:
    handler = Handler(lambda x: ValueError(f"no {x}") if x < 0 else x)
    batcher = make(handler)
    running = await handler.hold_first(batcher, 0)
    batch = [asyncio.create_task(batcher.submit(i)) for i in (1, -2, 3)]
    await until(lambda: batcher.queue_depth == 3)
    handler.gate.set()
    await running
    results = await asyncio.gather(*batch, return_exceptions=True)
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ValueError) and str(results[1]) == "no -2"
    assert handler.batches[1] == [1, -2, 3]


async def test_stop_with_drain_completes_queued_work(make) -> None:
    handler = Handler()
    batcher = make(handler, max_batch_size=2)
    running = await handler.hold_first(batcher, 0)
    queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
    await until(lambda: batcher.queue_depth == 3)
    stopping = asyncio.create_task(batcher.stop(drain=True))
    await until(lambda: not batcher.running)
    with pytest.raises(BatcherStopped):
        await batcher.submit(9)
    handler.gate.set()
    await stopping
    assert [await running, *await asyncio.gather(*queued)] == [0, 10, 20, 30]
    assert not batcher.alive


async def test_stop_without_drain_fails_queued_work(make) -> None:
    handler = Handler()
    batcher = make(handler)
    running = await handler.hold_first(batcher, 0)
    queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    await until(lambda: batcher.queue_depth == 2)
    stopping = asyncio.create_task(batcher.stop(drain=False))
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(r, BatcherStopped) for r in results)
    handler.gate.set()
    await stopping
    assert await running == 0
    assert handler.batches == [[0]]
    assert not batcher.alive and batcher.queue_depth == 0


async def test_stop_timeout_fails_the_running_batch(make) -> None:
    handler = Handler()
    batcher = make(handler)
    running = await handler.hold_first(batcher, 0)
    await batcher.stop(drain=True, timeout=0.05)
    with pytest.raises(BatcherStopped):
        await running
    assert not batcher.alive


async def test_observer_receives_sizes_waits_and_depths(make) -> None:
    observer = Observer()
    handler = Handler()
    batcher = make(handler, max_batch_size=4, observer=observer)
    running = await handler.hold_first(batcher, 0)
    queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
    await until(lambda: batcher.queue_depth == 3)
    await asyncio.sleep(0.02)
    handler.gate.set()
    await running
    await asyncio.gather(*queued)
    assert [(name, size) for name, size, _, _ in observer.batches] == [("m", 1), ("m", 3)]
    waits = observer.batches[1][2]
    assert len(waits) == 3 and all(w >= 0.015 for w in waits)
    assert all(run >= 0 for *_, run in observer.batches)
    assert 3 in observer.depths and observer.depths[-1] == 0


async def test_failing_observer_does_not_break_the_loop(make) -> None:
    class Broken:
        def on_batch(self, *args: Any) -> None:
            raise RuntimeError("metrics down")

        def on_queue_depth(self, *args: Any) -> None:
            raise RuntimeError("metrics down")

    batcher = make(Handler(), observer=Broken())
    assert await batcher.submit(1) == 10
    assert await batcher.submit(2) == 20


async def test_submit_before_start_and_bad_settings() -> None:
    batcher: Batcher[int, int] = Batcher("m", Handler())
    with pytest.raises(NotReady):
        await batcher.submit(1)
    assert not batcher.alive and not batcher.running
    for bad in ({"max_batch_size": 0}, {"max_queue_size": 0}, {"max_batch_delay_s": -1.0}):
        with pytest.raises(ValueError):
            Batcher("m", Handler(), **bad)


class Gates:
    """A handler whose every batch waits on its own event (released one by one by the test)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gates: list[asyncio.Event] = []

    async def __call__(self, items: list[int]) -> list[int]:
        gate = asyncio.Event()
        self.batches.append(list(items))
        self.gates.append(gate)
        await gate.wait()
        return [x * 10 for x in items]


async def test_concurrent_batches_up_to_the_slot_count(make) -> None:
    handler = Gates()
    batcher = make(handler, max_batch_size=2, max_concurrent_batches=2)
    tasks = [asyncio.create_task(batcher.submit(0))]
    await until(lambda: len(handler.batches) == 1)
    tasks.append(asyncio.create_task(batcher.submit(1)))
    await until(lambda: len(handler.batches) == 2)  # a second batch runs beside the first
    tasks += [asyncio.create_task(batcher.submit(i)) for i in (2, 3, 4)]
    await until(lambda: batcher.queue_depth == 3)
    await asyncio.sleep(0.02)
    assert len(handler.batches) == 2  # both slots busy: the rest waits in the queue
    handler.gates[1].set()  # the second batch finishes first: its slot takes the next two
    await until(lambda: len(handler.batches) == 3)
    assert handler.batches[2] == [2, 3] and batcher.queue_depth == 1
    assert tasks[1].done() and not tasks[0].done()
    for gate in handler.gates:
        gate.set()
    await until(lambda: len(handler.batches) == 4)
    handler.gates[3].set()
    assert await asyncio.gather(*tasks) == [0, 10, 20, 30, 40]
    assert handler.batches == [[0], [1], [2, 3], [4]]


async def test_a_free_slot_takes_its_fair_share_of_the_queue(make) -> None:
    """A slot that frees up while the other is busy takes half of what is queued and running,
    not the whole queue: one long batch would hold the slowest requests while the other slot
    served the few left."""
    handler = Gates()
    batcher = make(handler, max_batch_size=32, max_concurrent_batches=2)
    tasks = [asyncio.create_task(batcher.submit(0))]
    await until(lambda: len(handler.batches) == 1)
    tasks.append(asyncio.create_task(batcher.submit(1)))
    await until(lambda: len(handler.batches) == 2)
    tasks += [asyncio.create_task(batcher.submit(i)) for i in range(2, 10)]
    await until(lambda: batcher.queue_depth == 8)
    handler.gates[0].set()  # 8 queued + 1 running over 2 slots: a share of 5
    await until(lambda: len(handler.batches) == 3)
    assert handler.batches[2] == [2, 3, 4, 5, 6] and batcher.queue_depth == 3
    handler.gates[1].set()  # 3 queued + 5 running: a share of 4, so all 3 left
    await until(lambda: len(handler.batches) == 4)
    assert handler.batches[3] == [7, 8, 9]
    for gate in handler.gates:
        gate.set()
    assert await asyncio.gather(*tasks) == [10 * i for i in range(10)]


async def test_stop_drains_every_running_batch(make) -> None:
    handler = Gates()
    batcher = make(handler, max_batch_size=1, max_concurrent_batches=2)
    tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
    await until(lambda: len(handler.batches) == 2)
    stopping = asyncio.create_task(batcher.stop(drain=True, timeout=5.0))
    await asyncio.sleep(0.02)
    assert not stopping.done()
    for _ in range(3):
        for gate in handler.gates:
            gate.set()
        await asyncio.sleep(0.01)
    await stopping
    assert await asyncio.gather(*tasks) == [0, 10, 20]
    assert not batcher.alive


async def test_stop_timeout_fails_every_running_batch(make) -> None:
    handler = Gates()
    batcher = make(handler, max_batch_size=1, max_concurrent_batches=2)
    tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
    await until(lambda: len(handler.batches) == 2)
    await batcher.stop(drain=True, timeout=0.05)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, BatcherStopped) for r in results)
    assert not batcher.alive


async def test_a_failing_batch_leaves_the_other_running(make) -> None:
    async def handler(items: list[int]) -> list[int]:
        await asyncio.sleep(0.02 if items[0] else 0.0)
        if items[0] == 0:
            raise RuntimeError("boom")
        return [x * 10 for x in items]

    batcher = make(handler, max_batch_size=1, max_concurrent_batches=2)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    assert isinstance(results[0], RuntimeError) and results[1:] == [10, 20, 30]
    assert await batcher.submit(5) == 50 and batcher.running


def test_max_concurrent_batches_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_concurrent_batches"):
        Batcher("m", Handler(), max_concurrent_batches=0)


async def test_batches_are_sized_to_their_deadlines(make) -> None:
    """Once an image is known to take a second, an item with less time left than that is
    answered 504 at collection, a batch stops before it would end past the earliest deadline
    in it, and a lone item with no chance still runs (its time keeps the estimate current)."""
    calls: list[list[Any]] = []

    async def handler(items: list[Any]) -> list[Any]:
        calls.append(list(items))
        await asyncio.sleep(1.0 * len(items))
        return [x * 10 for x in items]

    batcher = make(handler)
    assert await batcher.submit(1, timeout=30.0) == 10  # teaches the batcher: 1 s per image
    both = asyncio.gather(batcher.submit(2, timeout=30.0), batcher.submit(3, timeout=0.6),
                          return_exceptions=True)  # fmt: skip
    answer, refused = await both
    assert answer == 20 and isinstance(refused, DeadlineExceeded)
    assert "cannot answer within the request's deadline" in str(refused.detail)
    assert await asyncio.gather(
        batcher.submit(4, timeout=1.8), batcher.submit(5, timeout=30.0)
    ) == [
        40,
        50,
    ]
    assert calls == [[1], [2], [4], [5]]  # 4 and 5 together would end after 4's deadline
    with pytest.raises(DeadlineExceeded, match="deadline passed"):
        await batcher.submit(6, timeout=0.0)


async def test_newest_first_when_the_oldest_would_miss_its_deadline(make) -> None:
    handler = Handler()
    batcher = make(handler)
    running = await handler.hold_first(batcher, 0)
    await asyncio.sleep(1.0)
    handler.gate.set()
    assert await running == 0  # a batch of one took at least a second
    handler.gate.clear()
    held = asyncio.create_task(batcher.submit(10, timeout=30.0))
    await asyncio.wait_for(handler.entered.wait(), 1.0)
    await until(lambda: handler.batches[-1] == [10])
    queued = [asyncio.create_task(batcher.submit(i, timeout=3.5)) for i in (1, 2, 3)]
    await until(lambda: batcher.queue_depth == 3)
    await asyncio.sleep(1.0)  # each has at most 2.5 s left: the last would miss behind 3 s
    handler.gate.set()
    await held
    await asyncio.gather(*queued, return_exceptions=True)
    assert handler.batches[2][0] == 3  # the newest went first


async def test_newest_first_when_the_newest_has_less_time_left_than_the_oldest_has_waited(
    make,
) -> None:
    """The recent batch times say the backlog clears in time (3 x 0.2 s for 0.7 s left), but
    the oldest item has waited a full second already: in arrival order the newest would wait
    as long, so it goes first."""
    handler = Handler()
    batcher = make(handler, max_batch_size=1)
    for i in range(20):  # quick batches: the recent time of a batch of one is about 0
        assert await batcher.submit(i) == i * 10
    running = await handler.hold_first(batcher, 100)
    oldest = asyncio.create_task(batcher.submit(1, timeout=30.0))
    await asyncio.sleep(0.9)
    newer = [asyncio.create_task(batcher.submit(i, timeout=0.8)) for i in (2, 3)]
    await until(lambda: batcher.queue_depth == 3)
    await asyncio.sleep(0.1)  # held for 1 s: a batch of one now averages about 0.2 s
    handler.gate.set()
    await running
    await asyncio.gather(oldest, *newer, return_exceptions=True)
    assert handler.batches[21] == [3]  # the newest went first
