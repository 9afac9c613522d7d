"""Prometheus metrics of one app, on its own CollectorRegistry (tests build many apps).

`Metrics` is also the batchers' `BatchObserver` (one per model version, `observer`): batch sizes,
queue waits, inference time and queue depth are recorded where the batcher measures them, and
each inference request's outcome and phases from its `service.observe.RequestContext`.
Model-level series carry `model` and `version` labels; the v2 statistics extension reads its
numbers back from these same series. Names follow Prometheus conventions (base units, `_total`
for the counter). The registry also carries prometheus-client's standard process (`process_*`:
CPU seconds, resident memory, open files) and Python (`python_gc_*`, `python_info`) collectors,
as its default registry would.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from service.observe import RequestContext

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MODEL = ["model", "version"]


class _VersionObserver:
    """The batcher observer of one model version: its name from the batcher, its version here."""

    def __init__(self, metrics: Metrics, version: str) -> None:
        self._metrics, self._version = metrics, version

    def on_batch(self, name: str, size: int, queue_waits: list[float], run_seconds: float) -> None:
        self._metrics.on_batch(name, size, queue_waits, run_seconds, self._version)

    def on_queue_depth(self, name: str, depth: int) -> None:
        self._metrics.on_queue_depth(name, depth, self._version)


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
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            "attnserve_batch_size",
            "Images per forward pass.",
            MODEL,
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self.inference_duration = Histogram(
            "attnserve_inference_duration_seconds",
            "Time the batch handler took (stack, forward on the device, the batch's maps, split).",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_depth = Gauge(
            "attnserve_queue_depth", "Images waiting in a model's queue.", MODEL, registry=reg
        )
        self.inference_requests = Histogram(
            "attnserve_inference_request_duration_seconds",
            "Inference requests (HTTP and gRPC) by model version and outcome (success, fail), "
            "from admission to the encoded answer.",
            [*MODEL, "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.compute_input = Histogram(
            "attnserve_compute_input_seconds",
            "Per successful inference request: reading, decoding and preprocessing its inputs.",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.compute_output = Histogram(
            "attnserve_compute_output_seconds",
            "Per successful inference request: building and encoding its outputs.",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.last_inference = Gauge(
            "attnserve_last_inference_timestamp_seconds",
            "When a model version last ran a batch (Unix time).",
            MODEL,
            registry=reg,
        )
        self.device_memory = Gauge(
            "attnserve_device_memory_bytes",
            "CUDA memory held by torch on the serving device (CUDA only).",
            ["device", "kind"],
            registry=reg,
        )

    def observer(self, version: int) -> _VersionObserver:
        """The batcher observer for one version of a model."""
        return _VersionObserver(self, str(version))

    def on_batch(
        self,
        name: str,
        size: int,
        queue_waits: list[float],
        run_seconds: float,
        version: str = "1",
    ) -> None:
        """Record one batch: its size, each item's queue wait and the handler's duration."""
        self._child(self.batch_size, name, version).observe(size)
        wait = self._child(self.queue_wait, name, version)
        for seconds in queue_waits:
            wait.observe(seconds)
        self._child(self.inference_duration, name, version).observe(run_seconds)
        self._child(self.last_inference, name, version).set(time.time())

    def on_queue_depth(self, name: str, depth: int, version: str = "1") -> None:
        """Track the number of queued images of model `name`."""
        self._child(self.queue_depth, name, version).set(depth)

    def observe_inference(self, name: str, version: int, ok: bool, request: RequestContext) -> None:
        """Record one finished inference request: its outcome and duration, and for a success
        the input (arrival to first item queued) and output (last batch done to now) phases."""
        now = time.monotonic()
        labels = (name, str(version))
        outcome = "success" if ok else "fail"
        self._child(self.inference_requests, *labels, outcome).observe(now - request.started)
        if ok and request.first_enqueued and request.last_answered:
            inputs = request.first_enqueued - request.started
            self._child(self.compute_input, *labels).observe(inputs)
            self._child(self.compute_output, *labels).observe(now - request.last_answered)

    def value(self, sample: str, **labels: str) -> float:
        """The current value of one sample of this registry (0 when it has none yet)."""
        return self.registry.get_sample_value(sample, labels) or 0.0

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
