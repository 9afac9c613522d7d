"""Request bodies -> image bytes and options, with every size limit enforced while reading.

Three forms carry images: multipart/form-data (one file part per image), a raw body with an image
content type (one image), and JSON `{"images": [<base64>, ...], <options>}`. The body is refused
from its Content-Length header when that is too large, and counted while it streams otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from service.api.schemas import JsonPredictBody
from service.errors import (
    BadRequest,
    ClientDisconnected,
    InvalidImage,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from service.imaging import ACCEPTED_IMAGE_TYPES
from service.pipeline import check_count

__all__ = ["ACCEPTED_CONTENT_TYPES", "Payload", "read_payload"]

MULTIPART = "multipart/form-data"
JSON = "application/json"
ACCEPTED_CONTENT_TYPES = (MULTIPART, JSON, *ACCEPTED_IMAGE_TYPES)
_GENERIC_PART_TYPES = ("", "application/octet-stream")


@dataclass
class Payload:
    """The images of one request and the options its body carried (form fields or JSON keys)."""

    images: list[bytes]
    options: dict[str, Any] = field(default_factory=dict)


def media_type(request: Request) -> str:
    """The request's content type without parameters, lower case ("" when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refused with 413 as soon as the header or the bytes received exceed it,
    and with 408 when no part of it arrives for `timeout_s` (a stalled client frees its slot)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"the body is {int(declared)} bytes (Content-Length), more than the limit of "
            f"{limit} bytes. Hint: send fewer or smaller images per request."
        )
    chunks: list[bytes] = []
    received = 0
    stream = request.stream()
    try:
        while True:
            try:
                async with asyncio.timeout(timeout_s):
                    chunk = await anext(stream)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise RequestTimeout(
                    f"the body stopped arriving: nothing for {timeout_s:g} s after {received} bytes"
                ) from None
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(
                    f"the body exceeded the limit of {limit} bytes while streaming. "
                    "Hint: send fewer or smaller images per request."
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected("the client disconnected while sending the body") from None
    return b"".join(chunks)


async def read_payload(
    request: Request, *, max_body_bytes: int, max_images: int, body_timeout_s: float
) -> Payload:
    """Parse any accepted form; 415 for other content types, 413 for too much data."""
    kind = media_type(request)
    if kind not in ACCEPTED_CONTENT_TYPES:
        raise UnsupportedMediaType(
            f"content type {kind or '(none)'!r} is not accepted; send one of: "
            f"{', '.join(ACCEPTED_CONTENT_TYPES)}"
        )
    body = await read_body(request, max_body_bytes, body_timeout_s)
    if kind == MULTIPART:
        payload = await _multipart(request, body, max_images)
    elif kind == JSON:
        payload = _json(body, max_images)
    else:
        payload = Payload([body])
    check_count(len(payload.images), max_images)
    return payload


async def _multipart(request: Request, body: bytes, max_images: int) -> Payload:
    """Every file part is an image; text fields are options."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=max(1024, max_images + 1))
    images: list[bytes] = []
    options: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                _check_part_type(name, value.content_type or "")
                images.append(await value.read())
            else:
                options[name] = value
    finally:
        await form.close()
    return Payload(images, options)


def _check_part_type(name: str, content_type: str) -> None:
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind not in ACCEPTED_IMAGE_TYPES and kind not in _GENERIC_PART_TYPES:
        raise UnsupportedMediaType(
            f"file part {name!r} has content type {kind!r}; accepted: "
            f"{', '.join(ACCEPTED_IMAGE_TYPES)} (or application/octet-stream)"
        )


def _json(body: bytes, max_images: int) -> Payload:
    """{"images": [...], options}: options are validated with the query ones (422 on error)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest('the JSON body must be an object like {"images": ["<base64>", ...]}')
    if isinstance(data.get("images"), list):
        check_count(len(data["images"]), max_images)
    parsed = JsonPredictBody.model_validate(data)
    options = parsed.model_dump(exclude_unset=True, exclude={"images"})
    return Payload([_b64(i, text) for i, text in enumerate(parsed.images)], options)


def decode_base64(text: str) -> bytes:
    """Standard base64 to bytes (data: URLs and whitespace accepted); ValueError if invalid."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None


def _b64(index: int, text: str) -> bytes:
    try:
        return decode_base64(text)
    except ValueError:
        raise InvalidImage(f"images[{index}] is not valid base64") from None
