"""Domain errors of attnserve, each carrying the HTTP status it maps to.

Plain Python (no FastAPI import) so that the batcher and the imaging code can raise them;
`service.api.handlers` turns every one into a JSON body `{"error": ..., "detail": ...}`.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class: `status_code` and `error` are fixed per class, `detail` per instance."""

    status_code: int = 500
    error: str = "internal_error"

    def __init__(self, detail: Any = None, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail if detail is not None else self.error)
        self.detail = detail
        self.headers = headers or {}


class InvalidImage(ServiceError):
    status_code = 400
    error = "invalid_image"


class BadRequest(ServiceError):
    status_code = 400
    error = "bad_request"


class UnknownModel(ServiceError):
    status_code = 404
    error = "unknown_model"


class RequestTimeout(ServiceError):
    """The request body stopped arriving; the answer closes the connection."""

    status_code = 408
    error = "request_timeout"

    def __init__(self, detail: Any = None) -> None:
        super().__init__(detail, headers={"Connection": "close"})


class PayloadTooLarge(ServiceError):
    status_code = 413
    error = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    error = "unsupported_media_type"


class InvalidOptions(ServiceError):
    status_code = 422
    error = "invalid_options"


class ClientDisconnected(ServiceError):
    """The client closed the connection before its answer was ready (nginx's 499)."""

    status_code = 499
    error = "client_closed_request"


class QueueFull(ServiceError):
    """The model's queue is at capacity; the client should retry after `retry_after` seconds."""

    status_code = 503
    error = "queue_full"

    def __init__(self, detail: Any = None, *, retry_after: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class NotReady(ServiceError):
    status_code = 503
    error = "not_ready"


class BatcherStopped(ServiceError):
    status_code = 503
    error = "shutting_down"


class DeadlineExceeded(ServiceError):
    status_code = 504
    error = "deadline_exceeded"
