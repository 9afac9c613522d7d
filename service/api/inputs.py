"""Request bodies -> image bytes and options, with every size limit enforced while reading.

Three forms carry images: multipart/form-data (one file part per image), a raw body with an image
content type (one image), and JSON `{"images": [<base64>, ...], <options>}`. The body is refused
from its Content-Length header when that is too large, and counted while it streams otherwise.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from service.errors import (
    BadRequest,
    ClientDisconnected,
    InvalidImage,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.imaging import ACCEPTED_IMAGE_TYPES
from service.maps import MapOptions

__all__ = ["ACCEPTED_CONTENT_TYPES", "JsonPredictBody", "Payload", "PredictOptions", "read_payload"]

MULTIPART = "multipart/form-data"
JSON = "application/json"
ACCEPTED_CONTENT_TYPES = (MULTIPART, JSON, *ACCEPTED_IMAGE_TYPES)
_GENERIC_PART_TYPES = ("", "application/octet-stream")


class PredictOptions(BaseModel):
    """Options of the predict and compare routes (query string, form fields or JSON body)."""

    top_k: int = Field(5, ge=1, le=1000, description="How many classes to return per image.")
    maps: Literal["none", "summary", "layers", "all"] = Field(
        "summary",
        description="none; summary (one map); layers (+ each site's spatial view); "
        "all (+ raw channel/coordinate/branch tensors).",
    )
    map_size: int | None = Field(
        None,
        ge=8,
        le=512,
        description="Longest side of the returned maps (default: the image's longest side, "
        "at most 64 and at least 8).",
    )
    map_format: Literal["json", "png"] = Field(
        "json", description="json number arrays, or base64 PNG heatmaps for 2-D maps."
    )

    def to_map_options(self) -> MapOptions:
        return MapOptions(self.top_k, self.maps, self.map_size, self.map_format)


class JsonPredictBody(PredictOptions):
    """The JSON request form: base64 images plus any option."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(
        min_length=1, description="Base64-encoded image files (data: URLs accepted)."
    )


@dataclass
class Payload:
    """The images of one request and the options its body carried (form fields or JSON keys)."""

    images: list[bytes]
    options: dict[str, Any] = field(default_factory=dict)


def media_type(request: Request) -> str:
    """The request's content type without parameters, lower case ("" when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as the header or the bytes received exceed it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"the body is {int(declared)} bytes (Content-Length), more than the limit of "
            f"{limit} bytes. Hint: send fewer or smaller images per request."
        )
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
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


async def read_payload(request: Request, *, max_body_bytes: int, max_images: int) -> Payload:
    """Parse any accepted form; 415 for other content types, 413 for too much data."""
    kind = media_type(request)
    if kind not in ACCEPTED_CONTENT_TYPES:
        raise UnsupportedMediaType(
            f"content type {kind or '(none)'!r} is not accepted; send one of: "
            f"{', '.join(ACCEPTED_CONTENT_TYPES)}"
        )
    body = await read_body(request, max_body_bytes)
    if kind == MULTIPART:
        payload = await _multipart(request, body, max_images)
    elif kind == JSON:
        payload = _json(body, max_images)
    else:
        payload = Payload([body])
    _check_count(len(payload.images), max_images)
    return payload


def _check_count(count: int, max_images: int) -> None:
    """413: the count is a size limit of the payload, like the byte limit (not a bad option)."""
    if count == 0:
        raise BadRequest(
            "the request carries no image; send file parts (multipart/form-data), a raw image "
            'body, or JSON {"images": [<base64>, ...]}'
        )
    if count > max_images:
        raise PayloadTooLarge(
            f"the request carries {count} images, more than the limit of {max_images} per "
            "request. Hint: split it into several requests."
        )


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
        _check_count(len(data["images"]), max_images)
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
