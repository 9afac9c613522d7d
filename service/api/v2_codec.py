"""Wire format of the Open Inference Protocol (KServe v2): request bodies in, response bodies out.
The tensor conversions (`input_tensor`, `raw_bytes`) serve the gRPC service too.

A body is a JSON header, optionally followed by raw tensor bytes (the binary tensor data
extension; `Inference-Header-Content-Length` gives the header's length). Numbers are
little-endian and row-major; each BYTES element is a 4-byte little-endian length and its bytes.
Request bodies may be gzip/deflate compressed; the size limit applies before and after.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request

from service.api.inputs import decode_base64, read_body
from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

__all__ = [
    "HEADER_LENGTH",
    "InputTensor",
    "OutputTensor",
    "Requested",
    "encode_response",
    "input_tensor",
    "parse_request",
    "raw_bytes",
    "read_infer_body",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
NUMERIC_TYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
        "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
        "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
    }.items()
}  # fmt: skip
_ENCODINGS = ("gzip", "deflate", "identity")
_LENGTH = struct.Struct("<I")
_END = object()


@dataclass(frozen=True)
class InputTensor:
    """One request input: numbers as an array of the given shape, BYTES as a flat list."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputTensor:
    """One response output: an array (numbers) or a flat list of bytes (BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    binary: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Requested:
    """One output asked for: raw bytes or JSON, and as the top `classes` strings if > 0."""

    name: str
    binary: bool
    classes: int = 0


async def read_infer_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, decompressed per Content-Encoding; 413 when either size exceeds `limit`,
    408 when it stalls for `timeout_s`."""
    body = await read_body(request, limit, timeout_s)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in _ENCODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; use one of {', '.join(_ENCODINGS)}"
        )
    if encoding == "identity":
        return body
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # detects the gzip or zlib wrapper
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"cannot decompress the {encoding} body: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(
            f"the decompressed body exceeds the limit of {limit} bytes. "
            "Hint: send fewer or smaller tensors per request."
        )
    if not inflater.eof or inflater.unused_data:
        raise BadRequest(f"the {encoding} body is truncated or has data after its end")
    return data


def parse_request(
    body: bytes, header_length: str | None
) -> tuple[dict[str, Any], list[InputTensor]]:
    """The JSON header and its inputs, binary data attached (400 on any inconsistency)."""
    size = len(body)
    if header_length is not None:
        if not header_length.strip().isdigit() or not 0 < int(header_length) <= size:
            raise BadRequest(
                f"{HEADER_LENGTH} {header_length!r} must be a length between 1 and {size}"
            )
        size = int(header_length)
    try:
        header = orjson.loads(body[:size])
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the inference request header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequest('the inference request must be a JSON object with "inputs"')
    entries = header.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise BadRequest('the inference request needs a non-empty "inputs" list')
    binary = memoryview(body)[size:]
    inputs = []
    for entry in entries:
        tensor, used = _input(entry, binary)
        binary = binary[used:]
        inputs.append(tensor)
    if len(binary):
        raise BadRequest(f"{len(binary)} bytes follow the inputs' binary data unclaimed")
    return header, inputs


def _input(entry: Any, binary: memoryview) -> tuple[InputTensor, int]:
    """One input entry and how many binary bytes it took."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise BadRequest('every input needs a "name", "datatype", "shape" and data')
    name, datatype, shape = entry["name"], entry.get("datatype"), entry.get("shape")
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"input {name!r}: parameters must be an object")
    size = parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or not 0 <= size <= len(binary) or "data" in entry:
            raise BadRequest(
                f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary)} "
                "binary bytes left (and an input carries data or binary_data_size, not both)"
            )
        return input_tensor(name, datatype, shape, parameters, raw=bytes(binary[:size])), size
    if "data" in entry:
        return input_tensor(name, datatype, shape, parameters, json=entry["data"]), 0
    raise BadRequest(f'input {name!r} has neither "data" nor binary_data_size')


def input_tensor(
    name: str,
    datatype: Any,
    shape: Any,
    parameters: dict[str, Any],
    *,
    raw: bytes | None = None,
    json: Any = None,
    elements: list[Any] | None = None,
) -> InputTensor:
    """One checked input from its data: `raw` bytes (the binary extension, gRPC's raw contents),
    `json` data (nested lists; BYTES as base64) or flat typed `elements` (gRPC contents: numbers,
    or BYTES as bytes)."""
    if datatype != "BYTES" and datatype not in NUMERIC_TYPES:
        raise BadRequest(f"input {name!r}: unknown or unsupported datatype {datatype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r}: shape must be a list of non-negative integers")
    count = math.prod(shape)
    data: np.ndarray | list[bytes]
    if raw is not None:
        data = _from_binary(name, datatype, count, raw)
    elif elements is None:
        data = _from_json(name, datatype, count, json)
    elif datatype == "BYTES":
        if len(elements) != count:
            raise BadRequest(f"input {name!r}: {len(elements)} BYTES elements, shape says {count}")
        data = [bytes(e) for e in elements]
    else:
        data = _from_json(name, datatype, count, elements)
    if isinstance(data, np.ndarray):
        data = data.reshape(shape)
    return InputTensor(name, datatype, tuple(shape), data, parameters)


def _from_binary(name: str, datatype: str, count: int, chunk: bytes) -> np.ndarray | list[bytes]:
    if datatype == "BYTES":
        return _split_bytes(name, count, chunk)
    dtype = NUMERIC_TYPES[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise BadRequest(
            f"input {name!r}: {len(chunk)} binary bytes for {count} {datatype} elements "
            f"({count * dtype.itemsize} bytes expected)"
        )
    return np.frombuffer(chunk, dtype=dtype)


def _split_bytes(name: str, count: int, chunk: bytes) -> list[bytes]:
    """BYTES elements: each a 4-byte little-endian length followed by that many bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise BadRequest(f"input {name!r}: truncated BYTES element length")
        (length,) = _LENGTH.unpack_from(chunk, offset)
        offset += 4
        if offset + length > len(chunk):
            raise BadRequest(f"input {name!r}: BYTES element {len(elements)} is truncated")
        elements.append(chunk[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise BadRequest(f"input {name!r}: {len(elements)} BYTES elements, shape says {count}")
    return elements


def _from_json(name: str, datatype: str, count: int, data: Any) -> np.ndarray | list[bytes]:
    if datatype == "BYTES":
        flat = _flatten(data)
        if len(flat) != count or not all(isinstance(e, str) for e in flat):
            raise BadRequest(
                f"input {name!r}: BYTES data must be {count} base64 strings (as the shape says)"
            )
        return [_b64(name, i, text) for i, text in enumerate(flat)]
    try:
        raw = np.asarray(data).reshape(-1)
    except ValueError:
        raise BadRequest(f"input {name!r}: data is not a regular {datatype} tensor") from None
    if raw.size != count:
        raise BadRequest(f"input {name!r}: {raw.size} elements, shape says {count}")
    return _cast(name, datatype, raw)


def _cast(name: str, datatype: str, raw: np.ndarray) -> np.ndarray:
    """JSON numbers to `datatype`, refusing what would change silently (fractions, overflow)."""
    dtype = NUMERIC_TYPES[datatype]
    allowed = "biuf" if dtype.kind == "f" else "biu"
    if raw.size and raw.dtype.kind not in allowed:
        kinds = "numbers" if dtype.kind == "f" else "integers"
        raise BadRequest(f"input {name!r}: {datatype} data must be {kinds}")
    if dtype.kind in "iu" and raw.size:
        limits = np.iinfo(dtype)
        if raw.min() < limits.min or raw.max() > limits.max:
            raise BadRequest(f"input {name!r}: values outside the {datatype} range")
    return raw.astype(dtype)


def _flatten(data: Any) -> list[Any]:
    """Leaves of nested lists in row-major order (iterative: nesting depth is client-chosen)."""
    leaves, stack = [], [iter([data])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            leaves.append(item)
    return leaves


def _b64(name: str, index: int, text: str) -> bytes:
    """Base64 (standard alphabet; data: URLs and whitespace accepted) to bytes."""
    try:
        return decode_base64(text)
    except ValueError:
        raise BadRequest(f"input {name!r}: element {index} is not valid base64") from None


def join_bytes(elements: list[bytes]) -> bytes:
    """Serialise BYTES elements for the binary extension."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def encode_response(head: dict[str, Any], outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    entries, chunks = [], []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        parameters = dict(out.parameters)
        if out.binary:
            raw = raw_bytes(out)
            parameters["binary_data_size"] = len(raw)
            chunks.append(raw)
        elif isinstance(out.data, list):
            entry["data"] = [e.decode("utf-8", "replace") for e in out.data]
        else:
            entry["data"] = np.ascontiguousarray(out.data).reshape(-1)
        if parameters:
            entry["parameters"] = parameters
        entries.append(entry)
    header = orjson.dumps({**head, "outputs": entries}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def raw_bytes(out: OutputTensor) -> bytes:
    """An output's raw bytes: numbers row-major little-endian, BYTES length-prefixed."""
    if isinstance(out.data, list):
        return join_bytes(out.data)
    array = out.data
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
