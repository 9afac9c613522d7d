"""What is known about one HTTP request while it runs, and what is reported when it ends.

`RequestMiddleware` gives every request a `RequestContext` (in a context variable, so the
pipeline and the batcher reach it without passing it down): its request ID (the client's
`X-Request-ID` when valid, else a fresh one, echoed in the answer and every error body), its
deadline, and the timings of its stages. When the request ends, the same numbers feed the
Prometheus metrics, one access-log line and, when OpenTelemetry is on, one span per stage.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

__all__ = [
    "MODEL_SCOPE_KEY",
    "REQUEST_ID_HEADER",
    "JsonFormatter",
    "RequestContext",
    "RequestMiddleware",
    "assign_request_id",
    "client_request_id",
    "configure_logging",
    "current_request",
    "request_id_of",
    "request_scope",
    "stage",
]

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_SCOPE_KEY = "attnserve.request_id"
MODEL_SCOPE_KEY = "attnserve.model"
"""ASGI scope key under which an adapter names the request's model (a metrics label)."""
_VALID_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

access_log = logging.getLogger("attnserve.access")


@dataclass(slots=True)
class RequestContext:
    """One request: its ID, its deadline (monotonic seconds, None: none) and stage timings.

    `stages` holds (name, start, end) in monotonic seconds: decode, queue, forward, encode.
    A request with several images keeps the longest queue wait and the largest batch.
    """

    request_id: str
    started: float
    deadline: float | None = None
    stages: list[tuple[str, float, float]] = field(default_factory=list)
    queue_wait_s: float = 0.0
    batch_size: int = 0
    answer_bytes: int | None = None  # the budget's bound on the answer's size, once checked
    first_enqueued: float = 0.0  # inputs ready: the first item queued
    last_answered: float = 0.0  # results back: the last item's batch done

    def note_batch(self, enqueued: float, started: float, ended: float, size: int) -> None:
        """One of this request's items ran in a batch of `size` (the batcher calls this)."""
        if not self.first_enqueued or enqueued < self.first_enqueued:
            self.first_enqueued = enqueued
        self.last_answered = max(self.last_answered, ended)
        if started - enqueued >= self.queue_wait_s:
            self.queue_wait_s = started - enqueued
            self.stages.append(("queue", enqueued, started))
            self.stages.append(("forward", started, ended))
        self.batch_size = max(self.batch_size, size)


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "attnserve_request", default=None
)


def current_request() -> RequestContext | None:
    """The running request's context (None outside a request)."""
    return _current.get()


@contextlib.contextmanager
def request_scope(timeout_s: float, request_id: str | None = None) -> Iterator[RequestContext]:
    """The running request's context, or a new one (with this deadline) for the duration: a
    protocol without the HTTP middleware (gRPC) gets the same deadline and timings."""
    context = _current.get()
    if context is not None:
        yield context
        return
    started = time.monotonic()
    context = RequestContext(request_id or uuid.uuid4().hex, started, started + timeout_s)
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time a stage of the current request (no-op outside a request)."""
    context = _current.get()
    if context is None:
        yield
        return
    start = time.monotonic()
    try:
        yield
    finally:
        context.stages.append((name, start, time.monotonic()))


def request_id_of(scope: Scope) -> str | None:
    """The request ID the middleware gave this request."""
    value = scope.get(REQUEST_ID_SCOPE_KEY)
    return value if isinstance(value, str) else None


class RequestMiddleware:
    """Request ID, deadline, metrics, access log and spans for every HTTP request."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, timeout_s: float, tracing: bool = False
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.tracer = _tracer() if tracing else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        request_id = assign_request_id(scope)
        context = RequestContext(request_id, started, started + self.timeout_s)
        token = _current.set(context)
        status, sent = 500, 0
        header = (REQUEST_ID_HEADER.encode(), request_id.encode())

        async def send_and_record(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), header]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            _current.reset(token)
            ended = time.monotonic()
            route = getattr(scope.get("route"), "path", "unmatched")
            model = str(scope.get(MODEL_SCOPE_KEY, ""))
            self.metrics.observe_request(model, route, status, ended - started)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "%s %s %d %.1fms id=%s",
                    scope.get("method", ""),
                    scope.get("path", ""),
                    status,
                    (ended - started) * 1000,
                    request_id,
                    extra={
                        "request_id": request_id,
                        "method": scope.get("method", ""),
                        "route": route,
                        "model": model,
                        "status": status,
                        "latency_ms": round((ended - started) * 1000, 3),
                        "queue_ms": round(context.queue_wait_s * 1000, 3),
                        "batch_size": context.batch_size,
                        "bytes": sent,
                    },
                )
            if self.tracer is not None:
                self._spans(context, scope, route, model, status, ended)

    def _spans(
        self, context: RequestContext, scope: Scope, route: str, model: str, status: int, end: float
    ) -> None:
        """A request span with one child per stage, timed after the fact (wall-clock ns)."""
        from opentelemetry import trace

        offset_ns = time.time_ns() - int(time.monotonic() * 1e9)

        def ns(t: float) -> int:
            return offset_ns + int(t * 1e9)

        attributes = {"attnserve.request_id": context.request_id, "http.route": route,
                      "attnserve.model": model, "http.response.status_code": status}  # fmt: skip
        assert self.tracer is not None
        root = self.tracer.start_span(
            f"{scope.get('method', '')} {route}", start_time=ns(context.started),
            attributes=attributes,
        )  # fmt: skip
        parent = trace.set_span_in_context(root)
        for name, start, stop in context.stages:
            child = self.tracer.start_span(
                name, context=parent, start_time=ns(start),
                attributes={"attnserve.request_id": context.request_id},
            )  # fmt: skip
            child.end(end_time=ns(stop))
        root.end(end_time=ns(end))


def _tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer("attnserve")


def client_request_id(value: bytes) -> str | None:
    """An X-Request-ID header's value if it is 1-128 safe characters, else None."""
    text = value.decode("latin-1")
    return text if _VALID_ID.fullmatch(text) else None


def assign_request_id(scope: Scope) -> str:
    """The request's ID, kept in its scope: the client's valid X-Request-ID, else a fresh one."""
    request_id = None
    for key, value in scope.get("headers", []):
        if key == REQUEST_ID_HEADER.encode():
            request_id = client_request_id(value)
            break
    request_id = request_id or uuid.uuid4().hex
    scope[REQUEST_ID_SCOPE_KEY] = request_id
    return request_id


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the record's extra fields, and
    the exception's traceback as text when there is one."""

    converter = time.gmtime
    _STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
        "message",
        "asctime",
        "color_message",
    }

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str) -> None:
    """The process's logging: `fmt` "json" (one object a line, `JsonFormatter`) or "text", at
    `level` (uvicorn's "trace" is debug here). uvicorn's own access log is off: the
    middleware writes one line per request, with its ID (service.server)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if level == "trace" else level.upper())
