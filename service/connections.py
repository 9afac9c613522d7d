"""HTTP connection limits: uvicorn's options and the protocol class that adds what uvicorn lacks.

uvicorn (httptools) never times out a client that sends nothing or sends its headers slowly,
accepts headers of any size and number, and answers malformed HTTP and its concurrency limit in
plain text. `GuardedHttpProtocol` adds a header timeout (from the start of the connection or of
the request until the headers are complete), limits on the head's size and header count (431),
and JSON bodies for those answers, for malformed HTTP (400) and past the connection cap (503).
Each of these answers carries a request ID like every other: the client's valid X-Request-ID if
its header was read, else a fresh one, in the `X-Request-ID` header, the body and the log line.
The body timeout is enforced where the body is read (`service.api.inputs.read_body`, 408).
`uvicorn_options(settings)` is everything uvicorn.Config needs from the settings.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, ClassVar

import orjson
from starlette.requests import Request
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.api.handlers import respond
from service.observe import REQUEST_ID_HEADER, assign_request_id, client_request_id
from service.settings import Settings

__all__ = ["GuardedHttpProtocol", "uvicorn_options"]

logger = logging.getLogger(__name__)


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing (httptools then raises a parse error)."""


def error_bytes(
    status: int,
    error: str,
    detail: str,
    default_headers: list[tuple[bytes, bytes]],
    request_id: str,
) -> bytes:
    """A complete `Connection: close` HTTP/1.1 answer with the JSON error body."""
    body = orjson.dumps({"error": error, "detail": detail, "request_id": request_id})
    head = [STATUS_LINE[status]]
    for name, value in default_headers:
        head.extend([name, b": ", value, b"\r\n"])
    head.extend(
        [
            REQUEST_ID_HEADER.encode() + b": " + request_id.encode() + b"\r\n",
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
    )
    return b"".join(head)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the header timeout, head limits and JSON refusals.

    Subclassed per process by `uvicorn_options` with the limits as class attributes, since
    uvicorn builds one instance per connection from the class alone.
    """

    header_timeout_s: ClassVar[float] = 10.0
    body_timeout_s: ClassVar[float] = 15.0
    max_header_bytes: ClassVar[int] = 32 * 1024
    max_header_count: ClassVar[int] = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The parent answers its own concurrency check in plain text; this class checks instead.
        self.max_concurrency = self.limit_concurrency
        self.limit_concurrency = None
        self.served_app = self.app
        self.head_timer: asyncio.TimerHandle | None = None
        self.linger_timer: asyncio.TimerHandle | None = None
        self.in_head = True  # waiting for or reading a request line and headers
        self.head_begun = False  # some of the current head has arrived
        self.head_raw = 0  # bytes received of the current head (bounds an unfinished line)
        self.began_in_chunk = False  # a request began in the data being parsed
        self.parsed_in_chunk = 0  # bytes of earlier heads and bodies in the data being parsed
        self.head_size = 0  # exact size of the parsed request line and headers
        self.header_count = 0
        self.request_id: str | None = None  # the current head's valid X-Request-ID, once read
        self.refusal: tuple[int, str, str] | None = None  # the answer a callback asked for

    # Connection lifetime
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.head_timer, self.linger_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.began_in_chunk, self.parsed_in_chunk = False, 0
        super().data_received(data)  # parse errors and refusals end in send_400_response
        if not self.in_head or self.transport.is_closing():
            return
        # httptools holds an unfinished header line without calling back: bound it from here.
        if self.began_in_chunk:
            self.head_raw = len(data) - self.parsed_in_chunk
        else:
            self.head_raw += len(data)
        if self.head_raw > self.max_header_bytes:
            self._answer(
                431, "headers_too_large", f"the request head exceeds {self.max_header_bytes} bytes"
            )

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = self.head_begun = self.began_in_chunk = True
        self.head_raw = self.head_size = self.header_count = 0
        self.request_id = None
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self.head_size += len(url)
        if self.head_size > self.max_header_bytes:
            self._refuse(431, "headers_too_large", f"the URL exceeds {self.max_header_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        self.header_count += 1
        if name.lower() == REQUEST_ID_HEADER.encode():
            self.request_id = client_request_id(value)
        if self.header_count > self.max_header_count:
            self._refuse(431, "headers_too_large", f"more than {self.max_header_count} headers")
        if self.head_size > self.max_header_bytes:
            self._refuse(
                431, "headers_too_large", f"the request head exceeds {self.max_header_bytes} bytes"
            )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.in_head = self.head_begun = False
        self.parsed_in_chunk += self.head_size
        self._cancel_head_timer()
        limit = self.max_concurrency
        if limit is not None and (len(self.connections) > limit or len(self.tasks) >= limit):
            logger.warning("over the limit of %d connections: answered 503", limit)
            self.app = _over_capacity
        else:
            self.app = self.served_app
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.parsed_in_chunk += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.linger_timer is not None:  # the unread body of an answered request has ended
            self.linger_timer.cancel()
            self.linger_timer = None
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not self.transport.is_closing():
            # Answered before its body arrived (401, 413, 404...): the rest is read and dropped,
            # and the connection closed if it has not all arrived within the body timeout.
            self.linger_timer = self.loop.call_later(self.body_timeout_s, self.transport.close)

    # Answers the application never sees
    def send_400_response(self, msg: str) -> None:
        refusal, self.refusal = self.refusal, None
        if refusal is not None:
            self._answer(*refusal)
        else:
            self._answer(400, "bad_request", f"malformed HTTP request: {msg}")

    def _refuse(self, status: int, error: str, detail: str) -> None:
        """From a parser callback: stop parsing and answer `status` instead of 400."""
        self.refusal = (status, error, detail)
        raise _Refused(detail)

    def _answer(self, status: int, error: str, detail: str) -> None:
        """Write the JSON error (unless another answer is being written), log it, and close."""
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            request_id = self.request_id or uuid.uuid4().hex
            logger.info("connection answered %d %s: %s id=%s", status, error, detail, request_id)
            headers = self.server_state.default_headers
            self.transport.write(error_bytes(status, error, detail, headers, request_id))
        self.transport.close()

    def _arm_head_timer(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if not self.head_begun:  # nothing of a request arrived: close quietly
            self.transport.close()
            return
        self._answer(
            408,
            "request_timeout",
            f"the request line and headers did not arrive within {self.header_timeout_s:g} s",
        )


async def _over_capacity(scope: Scope, receive: Receive, send: Send) -> None:
    """The 503 past the connection cap, as JSON in the shape of the request's API."""
    request_id = assign_request_id(scope)
    response = respond(
        Request(scope),
        503,
        "too_many_connections",
        "the server holds as many connections as it accepts; retry later",
        {"Retry-After": "1", "Connection": "close", REQUEST_ID_HEADER: request_id},
    )
    await response(scope, receive, send)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The connection keyword arguments of uvicorn.Config for `settings`."""
    protocol = type(
        "AttnserveHttpProtocol",
        (GuardedHttpProtocol,),
        {
            "header_timeout_s": settings.header_timeout_s,
            "body_timeout_s": settings.body_timeout_s,
            "max_header_bytes": settings.max_header_bytes,
            "max_header_count": settings.max_header_count,
        },
    )
    return {
        "http": protocol,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "limit_concurrency": settings.max_connections,
    }
