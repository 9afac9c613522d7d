"""Framework-free dynamic batcher: one bounded queue and one loop task per model.

The loop waits for a free batch slot (one per device instance) and the first item, then takes
what is queued at once, up to `max_batch_size` and the slot's fair share of the queued and
running items, so a lone request never waits for a timer;
`max_batch_delay_s > 0` opts into waiting (counted from the first item's arrival) for a fuller
batch. Each item has its own future, so a failure, a deadline or a client that went away affects
that item or that batch only. Imports neither torch nor FastAPI.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from service.errors import BatcherStopped, DeadlineExceeded, NotReady, QueueFull
from service.observe import RequestContext, current_request

__all__ = ["BatchObserver", "Batcher"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatchObserver(Protocol):
    """Receives the batcher's metrics; implementations must be cheap and must not block."""

    def on_batch(self, name: str, size: int, queue_waits: list[float], run_seconds: float) -> None:
        """One batch ran: its size, each item's seconds in the queue, the handler's seconds."""

    def on_queue_depth(self, name: str, depth: int) -> None:
        """The number of queued (not yet running) items changed."""


@dataclass(eq=False, slots=True)
class _Item:
    """A queued request: its payload, the future its caller awaits, its timing, and the request
    it belongs to (which learns its queue wait and batch)."""

    value: Any
    future: asyncio.Future[Any]
    enqueued: float
    deadline: float | None
    request: RequestContext | None


class Batcher(Generic[T, R]):
    """Groups concurrent `submit` calls into batches for `handler`.

    `max_concurrent_batches`: how many batches may be in the handler at once (one per device
    worker instance). The next batch is collected only when a slot is free, so items queue up
    while every instance is busy and the next batch is as full as it can be.

    `handler` is a coroutine function that returns one result (or exception) per input.
    """

    def __init__(
        self,
        name: str,
        handler: Callable[[list[T]], Any],
        *,
        max_batch_size: int = 32,
        max_batch_delay_s: float = 0.0,
        max_queue_size: int = 256,
        observer: BatchObserver | None = None,
        max_concurrent_batches: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_delay_s < 0:
            raise ValueError(f"max_batch_delay_s must be >= 0, got {max_batch_delay_s}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be >= 1, got {max_concurrent_batches}")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue_size = max_queue_size
        self.max_concurrent_batches = max_concurrent_batches
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._running: dict[asyncio.Task[None], list[_Item]] = {}
        self._handler = handler
        self._observer = observer
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._batch_s: dict[int, float] = {}  # batch size -> its recent run time (seconds)
        self._probe = False  # the last collection refused every item it saw

    @property
    def queue_depth(self) -> int:
        """Items waiting in the queue (the running batch not included)."""
        return len(self._queue)

    @property
    def alive(self) -> bool:
        """Whether the loop task exists and has not finished (readiness uses this)."""
        return self._task is not None and not self._task.done()

    @property
    def running(self) -> bool:
        """Whether the batcher accepts new items: started, alive and not stopping."""
        return self._accepting and self.alive

    def start(self) -> None:
        """Spawn the loop task on the running event loop."""
        if self._task is not None:
            raise RuntimeError(f"batcher {self.name!r} was already started")
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"batcher-{self.name}"
        )

    async def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop intake; finish queued work (`drain`) or fail it with BatcherStopped.

        After `timeout` seconds the loop is cancelled and whatever is left (the running batch
        included) fails with BatcherStopped.
        """
        self._accepting = False
        if not drain:
            self._fail_queued(BatcherStopped(f"model {self.name!r} is shutting down"))
        self._wakeup.set()
        task = self._task
        if task is None or task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            logger.warning("batcher %s: drain timed out after %ss, cancelling", self.name, timeout)
            task.cancel()
            await asyncio.wait({task})

    async def submit(self, item: T, timeout: float | None = None) -> R:
        """Queue one item and wait for its result.

        Raises QueueFull at once when the queue is at capacity, DeadlineExceeded when `timeout`
        seconds pass first, BatcherStopped once stopping, or whatever the handler raised for it.
        Cancelling the caller withdraws the item (a batch that has not started skips it).
        """
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded(f"the request's deadline passed before model {self.name!r}")
        future = self._enqueue(item, timeout)
        if timeout is None:
            return await future
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise DeadlineExceeded(f"model {self.name!r} did not answer in time") from None

    def _enqueue(self, item: T, timeout: float | None) -> asyncio.Future[R]:
        if not self.running:
            if self._task is None:
                raise NotReady(f"model {self.name!r} is not started yet")
            raise BatcherStopped(f"model {self.name!r} is shutting down")
        if len(self._queue) >= self.max_queue_size:
            self._prune_done()
            if len(self._queue) >= self.max_queue_size:
                raise QueueFull(
                    f"queue of model {self.name!r} is full ({self.max_queue_size} waiting)",
                    retry_after=self._retry_after(),
                )
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        self._queue.append(_Item(item, future, now, deadline, current_request()))
        self._wakeup.set()
        self._notify_depth()
        return future

    async def _loop(self) -> None:
        """Collect batches and hand each to its own task until stopped and drained.

        Exceptions fail one batch, never the loop. Cancelling the loop (stop's timeout) fails the
        queued items and the running batches with BatcherStopped.
        """
        try:
            while True:
                await self._slots.acquire()
                await self._wait_for_items()
                if not self._queue:  # stopped and drained
                    self._slots.release()
                    break
                batch = await self._collect()
                if not batch:
                    self._slots.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._serve(batch))
                self._running[task] = batch
                task.add_done_callback(self._batch_done)
            if self._running:
                await asyncio.wait(set(self._running))
        except asyncio.CancelledError:
            stopped = BatcherStopped(f"model {self.name!r} is shutting down")
            for task, batch in list(self._running.items()):
                task.cancel()
                self._fail(batch, stopped)
            self._fail_queued(stopped)
            raise

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._slots.release()

    async def _serve(self, batch: list[_Item]) -> None:
        """Run one batch; whatever goes wrong fails that batch only."""
        try:
            await self._run(batch)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                self._fail(batch, BatcherStopped(f"model {self.name!r} is shutting down"))
                raise
            logger.error("batcher %s: handler was cancelled", self.name)
            self._fail(batch, RuntimeError(f"handler of model {self.name!r} was cancelled"))
        except Exception as exc:
            logger.exception("batcher %s: batch of %d failed", self.name, len(batch))
            self._fail(batch, exc)

    async def _wait_for_items(self) -> None:
        """Block until something is queued or stop() was called."""
        while not self._queue and self._accepting:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _collect(self) -> list[_Item]:
        """Take what is queued up to the maximum, waiting for more only if a delay is set."""
        batch: list[_Item] = []
        self._take(batch)
        if self.max_batch_delay_s > 0 and batch:
            fill_until = batch[0].enqueued + self.max_batch_delay_s
            while len(batch) < self.max_batch_size and self._accepting:
                remaining = fill_until - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._wakeup.wait()
                except TimeoutError:
                    break
                self._take(batch)
            self._drop_dead(batch)
        self._notify_depth()
        return batch

    def _take(self, batch: list[_Item]) -> None:
        """Move live items (their callers still wait) from the queue into `batch`, up to the
        maximum, and only while the batch, at the recent time per item, still ends before the
        earliest deadline in it: a later item waits for the next batch. An item that could not
        finish even alone is answered 504 here instead of being computed for nobody. After a
        collection that refused everything, the next one runs its first item regardless, so
        that a stale estimate cannot refuse work for ever."""
        now = time.monotonic()
        earliest = math.inf
        probe, refused = self._probe, False
        limit = self._fair_share(len(batch))
        while self._queue and len(batch) < limit:
            newest_first = self._overloaded()
            item = self._queue.pop() if newest_first else self._queue.popleft()
            if item.future.done():
                continue
            left = math.inf if item.deadline is None else item.deadline - now
            alone = self.batch_time_s(1)
            if left < alone and not (probe and not batch):
                refused = True
                item.future.set_exception(
                    DeadlineExceeded(
                        f"model {self.name!r} cannot answer within the request's deadline: "
                        f"{max(0.0, left):.3f}s left, a batch of one takes {alone:.3f}s"
                    )
                )
                continue
            if batch and self.batch_time_s(len(batch) + 1) > min(earliest, left):
                (self._queue.append if newest_first else self._queue.appendleft)(item)
                break
            earliest = min(earliest, left)
            batch.append(item)
        self._probe = refused and not batch

    def _fair_share(self, collected: int) -> int:
        """The batch cap: the queued, running and `collected` items spread evenly over the
        batch slots (at most `max_batch_size`). A slot that frees up while the others are busy
        would otherwise take the whole queue into one long batch, whose items then make the
        latency tail while the other slots serve the few left (docs/performance.md, "Beside
        LitServe and TorchServe")."""
        running = sum(len(batch) for batch in self._running.values())
        waiting = len(self._queue) + collected + running
        share = math.ceil(waiting / self.max_concurrent_batches)
        return max(1, min(self.max_batch_size, share))

    def _overloaded(self) -> bool:
        """Whether the newest queued item would miss its deadline behind the backlog: behind
        as long as the oldest queued item has waited already, or as the recent batch times
        say the queue takes, whichever is longer. Then the newest items go first (adaptive
        LIFO): they can still meet their deadlines, while in arrival order every item would
        wait until close to its deadline and many would expire."""
        newest = self._queue[-1]
        if newest.deadline is None:
            return False
        now = time.monotonic()
        waited = now - self._queue[0].enqueued
        return newest.deadline - now < max(waited, self.expected_wait_s(len(self._queue)))

    def _drop_dead(self, batch: list[_Item]) -> None:
        """Drop items whose callers gave up (cancelled or past their deadline) while the batch
        was filling."""
        batch[:] = [item for item in batch if not item.future.done()]

    async def _run(self, batch: list[_Item]) -> None:
        """Call the coroutine handler once and hand each result (or exception) to its future."""
        start = time.monotonic()
        results = await self._handler([item.value for item in batch])
        self._deliver(batch, results, start, time.monotonic())

    def _deliver(self, batch: list[_Item], results: Any, start: float, end: float) -> None:
        """Hand each result (or exception) to its future; a wrong result count raises."""
        run_s = end - start
        waits = [start - item.enqueued for item in batch]
        size = len(batch)
        before = self._batch_s.get(size)
        self._batch_s[size] = run_s if before is None else 0.8 * before + 0.2 * run_s
        for item in batch:
            if item.request is not None:
                item.request.note_batch(item.enqueued, start, end, len(batch))
        if not isinstance(results, Sequence) or len(results) != len(batch):
            got = len(results) if isinstance(results, Sequence) else type(results).__name__
            raise RuntimeError(
                f"handler of model {self.name!r} returned {got} results for {len(batch)} inputs"
            )
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        self._observe(lambda o: o.on_batch(self.name, len(batch), waits, run_s))

    def _fail(self, batch: list[_Item], exc: BaseException) -> None:
        """Set `exc` on every unfinished future of `batch` so that no caller hangs."""
        for item in batch:
            if not item.future.done():
                item.future.set_exception(exc)

    def _fail_queued(self, exc: BaseException) -> None:
        """Empty the queue, failing every waiting item with `exc`."""
        items = list(self._queue)
        self._queue.clear()
        self._fail(items, exc)
        self._notify_depth()

    def _prune_done(self) -> None:
        """Forget queued items whose callers already gave up (frees room in a full queue)."""
        live = [item for item in self._queue if not item.future.done()]
        changed = len(live) != len(self._queue)
        if changed:
            self._queue.clear()
            self._queue.extend(live)
            self._notify_depth()

    def expected_wait_s(self, items: int) -> float:
        """Seconds until `items` items are answered: rounds of full batches over the concurrent
        batch slots, then one round of what is left, at the recent batch times (0 before any
        batch ran)."""
        full, rest = divmod(items, self.max_batch_size * self.max_concurrent_batches)
        last = math.ceil(rest / self.max_concurrent_batches)
        return full * self.batch_time_s(self.max_batch_size) + (last and self.batch_time_s(last))

    def batch_time_s(self, size: int) -> float:
        """The recent run time of a batch of `size` (0 before any batch ran): as measured for
        that size, else the nearest larger size's (a smaller batch is no slower), else the
        largest measured one's scaled up in proportion (a bigger batch is no faster per image)."""
        times = self._batch_s
        if not times:
            return 0.0
        if size in times:
            return times[size]
        larger = [n for n in times if n > size]
        if larger:
            return times[min(larger)]
        biggest = max(times)
        return times[biggest] * size / biggest

    def _retry_after(self) -> int:
        """Whole seconds until the current queue is likely served (at least 1)."""
        return max(1, math.ceil(self.expected_wait_s(len(self._queue))))

    def _notify_depth(self) -> None:
        depth = len(self._queue)
        self._observe(lambda o: o.on_queue_depth(self.name, depth))

    def _observe(self, call: Callable[[BatchObserver], None]) -> None:
        """Report to the observer; its errors are logged, never raised into the loop."""
        if self._observer is None:
            return
        try:
            call(self._observer)
        except Exception:
            logger.exception("batcher %s: observer failed", self.name)
