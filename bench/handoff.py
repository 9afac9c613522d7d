"""`python -m bench.handoff`: the CPU cost of handing a call to a thread pool and awaiting it.

A request hands work to the CPU pool twice (decode and preprocess, then build and encode the
answer). This times that hand-off alone, with a call that does nothing, on uvloop (as the
service runs): `loop.run_in_executor` on a `concurrent.futures.ThreadPoolExecutor` against
the service's `service.cpupool.CpuPool.call`, each with `--callers` concurrent callers and two
pool threads. Printed: process CPU and wall time per call, in microseconds.

    .venv/bin/python -m bench.handoff
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import uvloop

from service.cpupool import CpuPool

__all__ = ["main", "measure"]


def _nothing() -> None:
    return None


async def _timed(
    call: Callable[[], Awaitable[None]], callers: int, calls: int
) -> tuple[float, float]:
    """(process CPU, wall) seconds per call for `calls` calls split over `callers` tasks."""
    per_caller = max(1, calls // callers)

    async def caller() -> None:
        for _ in range(per_caller):
            await call()

    await asyncio.gather(*(caller() for _ in range(callers)))  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    total = per_caller * callers
    return (time.process_time() - cpu) / total, (time.perf_counter() - wall) / total


def measure(callers: int = 16, calls: int = 8000) -> dict[str, tuple[float, float]]:
    """{"run_in_executor": (cpu_s, wall_s), "CpuPool.call": (cpu_s, wall_s)} per call."""
    executor = ThreadPoolExecutor(2)
    pool = CpuPool(2, name="handoff")

    async def run() -> dict[str, tuple[float, float]]:
        loop = asyncio.get_running_loop()
        return {
            "run_in_executor": await _timed(
                lambda: loop.run_in_executor(executor, _nothing), callers, calls
            ),
            "CpuPool.call": await _timed(lambda: pool.call(loop, _nothing), callers, calls),
        }

    try:
        return uvloop.run(run())
    finally:
        executor.shutdown()
        pool.shutdown()


def main(argv: list[str] | None = None) -> None:
    summary = __doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m bench.handoff", description=summary)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--calls", type=int, default=8000)
    args = parser.parse_args(argv)
    for name, (cpu, wall) in measure(args.callers, args.calls).items():
        print(f"{name:<16} {1e6 * cpu:6.1f} us CPU, {1e6 * wall:6.1f} us wall per call")


if __name__ == "__main__":
    main()
