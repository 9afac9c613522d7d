"""A minimal HTTP/1.1 client on raw asyncio streams: prebuilt requests, keep-alive connections.

The load generator shares the machine's cores with the server, so a request costs one `bytes`
write, one header parse and one body read (`python -m bench.probes.clientcost` compares its CPU
per request with httpx's).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

__all__ = ["Connection", "HttpRequest"]


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A complete HTTP/1.1 request as bytes, built once and written as is on every send."""

    raw: bytes
    label: str = ""

    @classmethod
    def build(
        cls,
        method: str,
        host: str,
        port: int,
        path: str,
        body: bytes = b"",
        content_type: str | None = None,
        label: str = "",
    ) -> HttpRequest:
        """The request bytes: request line, Host, Content-Type/Length, blank line, body."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        if body or method != "GET":
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return cls(head + body, label or path)


class Connection:
    """One keep-alive connection; reconnects when the server closed it while idle."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reused = False

    async def send(self, request: HttpRequest) -> tuple[int, bytes]:
        """Send `request` and return (status, body); one retry if a reused connection was stale."""
        stale_retry = self._reused
        while True:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
                self._reused = False
            try:
                return await self._exchange(request)
            except (ConnectionResetError, asyncio.IncompleteReadError) as exc:
                await self.close()
                partial = getattr(exc, "partial", b"")
                if not stale_retry or partial:
                    raise
                stale_retry = False

    async def _exchange(self, request: HttpRequest) -> tuple[int, bytes]:
        assert self._reader is not None and self._writer is not None
        self._writer.write(request.raw)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked, close = None, False, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = value.strip().lower() == b"close"
        if chunked:
            body = await self._read_chunked()
        elif length is not None:
            body = await self._reader.readexactly(length)
        else:
            body, close = await self._reader.read(), True
        self._reused = True
        if close:
            await self.close()
        return status, body

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        parts = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await self._reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return b"".join(parts)
            parts.append((await self._reader.readexactly(size + 2))[:-2])

    async def close(self) -> None:
        """Close the socket (the next send reconnects)."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
