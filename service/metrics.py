"""Prometheus metrics of one app, on its own CollectorRegistry (tests build many apps).

`Metrics` is also the batchers' `BatchObserver`: batch sizes, queue waits, inference time and
queue depth are recorded where the batcher measures them. Names follow Prometheus conventions
(base units, `_total` for the counter). The registry also carries prometheus-client's standard
process (`process_*`: CPU seconds, resident memory, open files) and Python (`python_gc_*`,
`python_info`) collectors, as its default registry would.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The service's metrics; implements `service.batching.BatchObserver`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        reg = self.registry
        ProcessCollector(registry=reg)
        GCCollector(registry=reg)
        PlatformCollector(registry=reg)
        self.requests = Counter(
            "attnserve_requests_total",
            "HTTP requests by model, route template and status code.",
            ["model", "route", "status"],
            registry=reg,
        )
        self.request_duration = Histogram(
            "attnserve_request_duration_seconds",
            "Time from request arrival to the response start, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_wait = Histogram(
            "attnserve_queue_wait_seconds",
            "Time an image waited in its model's queue before its batch ran.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            "attnserve_batch_size",
            "Images per forward pass.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self.inference_duration = Histogram(
            "attnserve_inference_duration_seconds",
            "Time the batch handler took (stack, forward on the device, the batch's maps, split).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_depth = Gauge(
            "attnserve_queue_depth", "Images waiting in a model's queue.", ["model"], registry=reg
        )
        self.device_memory = Gauge(
            "attnserve_device_memory_bytes",
            "CUDA memory held by torch on the serving device (CUDA only).",
            ["device", "kind"],
            registry=reg,
        )

    def on_batch(self, name: str, size: int, queue_waits: list[float], run_seconds: float) -> None:
        """Record one batch: its size, each item's queue wait and the handler's duration."""
        self._child(self.batch_size, name).observe(size)
        wait = self._child(self.queue_wait, name)
        for seconds in queue_waits:
            wait.observe(seconds)
        self._child(self.inference_duration, name).observe(run_seconds)

    def on_queue_depth(self, name: str, depth: int) -> None:
        """Track the number of queued images of model `name`."""
        self._child(self.queue_depth, name).set(depth)

    def observe_request(self, model: str, route: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request and record its duration."""
        self._child(self.requests, model, route, str(status)).inc()
        self._child(self.request_duration, route).observe(seconds)

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set (it takes a lock each time)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def set_device_memory(self, device: str, memory: dict[str, int]) -> None:
        """Update the device memory gauge from `DeviceWorker.memory_bytes()` (empty on CPU)."""
        for kind, value in memory.items():
            self.device_memory.labels(device, kind).set(value)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
