"""A light HTTP/1.1 load generator on raw asyncio streams with keep-alive connections.

The client shares the machine's cores with the server, so each request costs one prebuilt
`bytes` write, one header parse and one body read. `closed_loop` keeps N requests in flight;
`open_loop` sends at a fixed arrival rate (Poisson or fixed interval) and drops arrivals beyond
`max_in_flight`, timing each request from its scheduled arrival. Every loop is bounded in time
and in count; results only count requests that finish inside the measured window.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.httpclient import Connection, HttpRequest

__all__ = [
    "StepResult",
    "arrival_times",
    "closed_loop",
    "open_loop",
]

Probe = Callable[[], Awaitable[dict[str, Any]]]
_NETWORK_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)
MAX_REQUESTS = 1_000_000


@dataclass
class StepResult:
    """What one load step measured inside its window (probes: snapshots at its two edges)."""

    mode: str
    window_s: float
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    drops: int = 0
    sent: int = 0
    response_bytes: int = 0
    probes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> int:
        """Requests answered 200 inside the window."""
        return len(self.latencies_s)

    def summary(self) -> dict[str, Any]:
        """Throughput, offered rate, latency percentiles (ms), errors, drops, mean body size."""
        lat = np.asarray(self.latencies_s) * 1000.0
        pct = dict.fromkeys(("p50", "p95", "p99", "mean", "max"), float("nan"))
        if lat.size:
            p50, p95, p99 = np.percentile(lat, [50, 95, 99])
            pct = {"p50": p50, "p95": p95, "p99": p99, "mean": lat.mean(), "max": lat.max()}
        return {
            "throughput_rps": self.ok / self.window_s,
            "offered_rps": self.sent / self.window_s,
            "requests_ok": self.ok,
            "requests_sent": self.sent,
            "errors": dict(self.errors),
            "error_count": sum(self.errors.values()),
            "drops": self.drops,
            "latency_ms": {k: round(float(v), 3) for k, v in pct.items()},
            "response_bytes_mean": self.response_bytes / self.ok if self.ok else 0.0,
        }


class _Window:
    """Counts only what ends inside [start, end) and takes the probes at both edges."""

    def __init__(self, result: StepResult, start: float, end: float) -> None:
        self.result, self.start, self.end = result, start, end

    def inside(self, t: float) -> bool:
        return self.start <= t < self.end

    def record(self, began: float, status: int, body: bytes) -> None:
        done = time.perf_counter()
        if not self.inside(done):
            return
        if status == 200:
            self.result.latencies_s.append(done - began)
            self.result.response_bytes += len(body)
        else:
            self.error(str(status), done)

    def error(self, kind: str, t: float) -> None:
        if self.inside(t):
            self.result.errors[kind] = self.result.errors.get(kind, 0) + 1

    async def probe_edges(self, probe: Probe | None) -> None:
        if probe is None:
            return
        for edge in (self.start, self.end):
            await asyncio.sleep(max(0.0, edge - time.perf_counter()))
            self.result.probes.append(await probe())


async def _send_recorded(
    conn: Connection, request: HttpRequest, began: float, window: _Window, timeout_s: float
) -> bool:
    """One request, recorded in `window`; False (connection closed) after a failure."""
    try:
        async with asyncio.timeout(timeout_s):
            status, body = await conn.send(request)
    except (*_NETWORK_ERRORS, TimeoutError) as exc:
        window.error(type(exc).__name__, time.perf_counter())
        await conn.close()
        return False
    window.record(began, status, body)
    return True


async def _finish(tasks: Sequence[asyncio.Task[Any]], grace_s: float) -> None:
    """Wait up to `grace_s` for running tasks, then cancel what is left."""
    pending = {t for t in tasks if not t.done()}
    if pending:
        _, pending = await asyncio.wait(pending, timeout=grace_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


async def closed_loop(
    host: str,
    port: int,
    requests: Sequence[HttpRequest],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    probe: Probe | None = None,
    timeout_s: float = 30.0,
    max_requests: int = MAX_REQUESTS,
) -> StepResult:
    """`concurrency` connections each sending its next request as soon as the last answered."""
    start = time.perf_counter() + warmup_s
    result = StepResult("closed", duration_s)
    window = _Window(result, start, start + duration_s)
    picks = itertools.count(random.Random(concurrency).randrange(len(requests)))
    budget = itertools.count()

    async def worker() -> None:
        conn = Connection(host, port)
        try:
            while time.perf_counter() < window.end and next(budget) < max_requests:
                began = time.perf_counter()
                window.result.sent += window.inside(began)
                if not await _send_recorded(
                    conn, requests[next(picks) % len(requests)], began, window, timeout_s
                ):
                    await asyncio.sleep(0.01)
        finally:
            await conn.close()

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await window.probe_edges(probe)
    await _finish(tasks, min(timeout_s, 30.0))
    return result


def arrival_times(rate: float, span_s: float, arrival: str, seed: int = 0) -> list[float]:
    """Offsets (s) of the arrivals in [0, span_s): fixed interval or a Poisson process."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if arrival == "fixed":
        return [i / rate for i in range(int(span_s * rate))]
    if arrival != "poisson":
        raise ValueError(f"arrival must be 'poisson' or 'fixed', got {arrival!r}")
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate)
    while t < span_s and len(times) < MAX_REQUESTS:
        times.append(t)
        t += rng.expovariate(rate)
    return times


class _Dispatcher:
    """Open-loop sending: idle keep-alive connections and the requests in flight."""

    def __init__(
        self, host: str, port: int, window: _Window, timeout_s: float, max_in_flight: int
    ) -> None:
        self.host, self.port, self.window = host, port, window
        self.timeout_s, self.max_in_flight = timeout_s, max_in_flight
        self.idle: list[Connection] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def dispatch(self, request: HttpRequest, scheduled: float) -> bool:
        """Start `request` now; False (dropped) when max_in_flight are outstanding."""
        if len(self.tasks) >= self.max_in_flight:
            return False
        task = asyncio.create_task(self._send(request, scheduled))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _send(self, request: HttpRequest, scheduled: float) -> None:
        conn = self.idle.pop() if self.idle else Connection(self.host, self.port)
        if await _send_recorded(conn, request, scheduled, self.window, self.timeout_s):
            self.idle.append(conn)

    async def finish(self, grace_s: float) -> None:
        """Let outstanding requests end (up to `grace_s`), then close every connection."""
        await _finish(list(self.tasks), grace_s)
        for conn in self.idle:
            await conn.close()


async def open_loop(
    host: str,
    port: int,
    requests: Sequence[HttpRequest],
    *,
    rate: float,
    duration_s: float,
    warmup_s: float,
    arrival: str = "poisson",
    probe: Probe | None = None,
    max_in_flight: int = 128,
    timeout_s: float = 30.0,
    seed: int = 0,
) -> StepResult:
    """Send at `rate` req/s; an arrival finding `max_in_flight` requests outstanding is dropped."""
    t0 = time.perf_counter()
    result = StepResult("open", duration_s)
    window = _Window(result, t0 + warmup_s, t0 + warmup_s + duration_s)
    sender = _Dispatcher(host, port, window, timeout_s, max_in_flight)
    edges = asyncio.create_task(window.probe_edges(probe))
    for i, offset in enumerate(arrival_times(rate, warmup_s + duration_s, arrival, seed)):
        scheduled = t0 + offset
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        counted = window.inside(scheduled)
        result.sent += counted
        if not sender.dispatch(requests[i % len(requests)], scheduled):
            result.drops += counted
    await edges
    await sender.finish(min(timeout_s, 30.0))
    return result
