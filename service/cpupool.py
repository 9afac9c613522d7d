"""The CPU pool: the threads that decode, preprocess and build responses, awaited from the loop.

`CpuPool.call(loop, fn, *args)` is the request path's hand-off: a job on a queue, and the
result handed back with one `loop.call_soon_threadsafe`. `loop.run_in_executor` on a
`concurrent.futures.ThreadPoolExecutor` does the same with a concurrent Future (and its
Condition), a work item and `asyncio.wrap_future`'s callbacks in both directions: 20-25 us of
CPU per call here against about 6 us (`.venv/bin/python -m bench.handoff`), and a request
makes two. The pool is still a `concurrent.futures.Executor` (`submit`), for the callers that
are not on the request path (model loading).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from queue import SimpleQueue
from typing import Any, TypeVar

__all__ = ["CpuPool"]

V = TypeVar("V")

logger = logging.getLogger(__name__)


class _LoopJob:
    """A call whose result goes to an asyncio future on `loop`."""

    __slots__ = ("args", "fn", "future", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
    ) -> None:
        self.loop, self.future, self.fn, self.args = loop, future, fn, args

    def run(self) -> None:
        if self.future.cancelled():  # its caller gave up before a thread took it
            return
        try:
            result = self.fn(*self.args)
        except BaseException as exc:  # handed to the caller, like run_in_executor does
            self._post(_set_exception, exc)
        else:
            self._post(_set_result, result)

    def cancel(self) -> None:
        self._post(_cancel, None)

    def _post(self, deliver: Callable[[asyncio.Future[Any], Any], None], value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            self.loop.call_soon_threadsafe(deliver, self.future, value)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _cancel(future: asyncio.Future[Any], _: Any) -> None:
    future.cancel()


class _ExecutorJob:
    """A call submitted through the Executor interface (a concurrent Future)."""

    __slots__ = ("args", "fn", "future", "kwargs")

    def __init__(self, future: Future[Any], fn: Callable[..., Any], args: tuple, kwargs: dict):
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)

    def cancel(self) -> None:
        self.future.cancel()


class CpuPool(Executor):
    """`threads` daemon threads named `<name>_<i>`, each running `initializer` first, taking
    jobs in submission order."""

    def __init__(
        self, threads: int, *, name: str, initializer: Callable[[], None] | None = None
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._queue: SimpleQueue[_LoopJob | _ExecutorJob | None] = SimpleQueue()
        self._initializer = initializer
        self._closed = False
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def call(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., V], *args: Any
    ) -> asyncio.Future[V]:
        """Run `fn(*args)` on a pool thread; the returned future (of `loop`, the caller's running
        loop) gets its result or exception. Cancelling the future before a thread takes the job
        skips it. RuntimeError after shutdown."""
        future: asyncio.Future[V] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.put(_LoopJob(loop, future, fn, args))
        return future

    def submit(self, fn: Callable[..., V], /, *args: Any, **kwargs: Any) -> Future[V]:
        """The Executor interface (`loop.run_in_executor` works with the pool too)."""
        future: Future[V] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put(_ExecutorJob(future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more jobs; with `cancel_futures`, cancel the queued ones; the threads stop
        after the jobs still queued (`wait`: return once they have)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if cancel_futures:
                    while not self._queue.empty():
                        job = self._queue.get_nowait()
                        if job is not None:
                            job.cancel()
                for _ in self._threads:
                    self._queue.put(None)
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join()

    def _work(self) -> None:
        if self._initializer is not None:
            try:
                self._initializer()
            except Exception:  # the thread still serves; what it set up is logged as missing
                logger.exception("CPU pool thread initializer failed")
        while True:
            job = self._queue.get()
            if job is None:
                return
            job.run()
            del job  # drop the result's references before waiting for the next job
