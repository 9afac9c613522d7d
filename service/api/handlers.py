"""JSON encoding and the one place where errors become responses.

Every error leaves the service as `{"error": <code>, "detail": <what to fix>}` with the status of
its `ServiceError` class; validation errors become 422 with one entry per problem; anything
unexpected is logged with its traceback and answered with a generic 500 (never a stack trace).
Under /v2 the Open Inference Protocol's shape `{"error": <message>}` is used instead, and every
503 there carries Retry-After.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import InvalidOptions, ServiceError
from service.observe import request_id_of

__all__ = ["ORJSONResponse", "error_response", "install_handlers", "respond"]

logger = logging.getLogger(__name__)

_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
V2_PREFIX = "/v2"


class ORJSONResponse(JSONResponse):
    """JSON response encoded with orjson (fast, compact, numpy-aware)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(
    status: int,
    error: str,
    detail: Any,
    headers: dict[str, str] | None = None,
    request_id: str | None = None,
) -> ORJSONResponse:
    """The error body every failure uses (with the request's ID once it has one)."""
    body = {"error": error, "detail": detail}
    if request_id is not None:
        body["request_id"] = request_id
    return ORJSONResponse(body, status_code=status, headers=headers)


def _is_v2(request: Request) -> bool:
    path = request.scope.get("path", "")
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def respond(
    request: Request, status: int, error: str, detail: Any, headers: dict[str, str] | None = None
) -> ORJSONResponse:
    """The v1 error body, or on /v2 paths `{"error": <message>}` (503s there get Retry-After);
    also used by the middlewares and the connection layer, so every error has one shape."""
    request_id = request_id_of(request.scope)
    if not _is_v2(request):
        return error_response(status, error, detail, headers, request_id)
    if isinstance(detail, list):
        message = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in detail)
    else:
        message = str(detail) if detail is not None else error
    headers = dict(headers or {})
    if status == 503:
        headers.setdefault("Retry-After", "1")
    # The OIP error object is {"error"} alone; the request ID is in the X-Request-ID header.
    return ORJSONResponse({"error": message}, status_code=status, headers=headers)


def validation_detail(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic errors reduced to JSON-safe {"loc", "msg", "type"} entries (no echoed input)."""
    return [
        {
            "loc": [str(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", "")),
            "type": str(error.get("type", "")),
        }
        for error in errors
    ]


async def _service_error(request: Request, exc: Exception) -> ORJSONResponse:
    if not isinstance(exc, ServiceError):
        return await _unexpected(request, exc)
    if exc.status_code >= 500:  # overload and deadlines: worth seeing, not worth a traceback
        logger.info("%s %s -> %d %s", request.method, request.url.path, exc.status_code, exc)
    return respond(request, exc.status_code, exc.error, exc.detail, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> ORJSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError | ValidationError) else []
    detail = validation_detail(errors)
    return respond(request, InvalidOptions.status_code, InvalidOptions.error, detail)


async def _http_error(request: Request, exc: Exception) -> ORJSONResponse:
    if not isinstance(exc, StarletteHTTPException):
        return await _unexpected(request, exc)
    error = _HTTP_ERRORS.get(exc.status_code, "http_error")
    return respond(request, exc.status_code, error, exc.detail, dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> ORJSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return respond(request, 500, "internal_error", "internal server error; see the server log")


def install_handlers(app: FastAPI) -> None:
    """Register the handlers on `app`."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
