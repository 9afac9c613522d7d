"""The CPU pool: results and errors back to the event loop, skipped cancelled jobs, shutdown."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from service.cpupool import CpuPool
from service.worker import name_os_thread


@pytest.fixture
def pool():
    pool = CpuPool(2, name="test-cpu", initializer=name_os_thread)
    yield pool
    pool.shutdown()


async def test_call_returns_the_result_from_a_named_pool_thread(pool: CpuPool) -> None:
    loop = asyncio.get_running_loop()

    def where(x: int) -> tuple[int, str, str]:
        native = Path(f"/proc/self/task/{threading.get_native_id()}/comm")
        comm = native.read_text().strip() if native.exists() else threading.current_thread().name
        return x * 2, threading.current_thread().name, comm

    value, name, comm = await pool.call(loop, where, 21)
    assert value == 42 and name.startswith("test-cpu_") and comm.startswith("test-cpu_")
    assert threading.current_thread().name != name


async def test_call_raises_the_jobs_exception(pool: CpuPool) -> None:
    def fail() -> None:
        raise ValueError("broken image")

    with pytest.raises(ValueError, match="broken image"):
        await pool.call(asyncio.get_running_loop(), fail)


async def test_a_job_cancelled_before_it_starts_never_runs() -> None:
    pool = CpuPool(1, name="test-one")
    loop = asyncio.get_running_loop()
    release, ran = threading.Event(), []
    try:
        blocker = pool.call(loop, release.wait, 5)
        skipped = pool.call(loop, ran.append, "skipped")
        skipped.cancel()
        release.set()
        assert await blocker is True
        assert await pool.call(loop, ran.append, "after") is None
        assert ran == ["after"]
    finally:
        pool.shutdown()


async def test_the_executor_interface_serves_run_in_executor(pool: CpuPool) -> None:
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(pool, pow, 2, 10) == 1024
    assert pool.submit(pow, 3, exp=2).result(timeout=5) == 9


async def test_shutdown_cancels_queued_jobs_and_refuses_new_ones() -> None:
    pool = CpuPool(1, name="test-stop")
    loop = asyncio.get_running_loop()
    release = threading.Event()
    blocker = pool.call(loop, release.wait, 5)
    queued = pool.call(loop, pow, 2, 2)
    queued_executor = pool.submit(pow, 2, 3)
    await asyncio.sleep(0.05)  # the thread has taken the blocker
    pool.shutdown(wait=False, cancel_futures=True)
    release.set()
    assert await blocker is True  # the running job finishes
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert queued_executor.cancelled()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.call(loop, pow, 2, 2)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(pow, 2, 2)
    pool.shutdown(wait=True)


def test_a_result_for_a_closed_loop_does_not_stop_the_thread() -> None:
    pool = CpuPool(1, name="test-closed")
    release = threading.Event()
    try:
        loop = asyncio.new_event_loop()
        pool.call(loop, release.wait, 5)
        loop.close()  # its caller is gone before the answer
        release.set()
        assert pool.submit(pow, 2, 5).result(timeout=5) == 32  # the thread still serves
    finally:
        pool.shutdown()


def test_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threads"):
        CpuPool(0, name="none")
