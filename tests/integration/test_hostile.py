"""Hostile-input corpus against the real server process: /v1 (predict, predict by block, compare)
and /v2 (infer as JSON and with binary data, model metadata and readiness).

Pass rule for every case: no 5xx; every 4xx carries a JSON body with "error" (on /v1 also
"detail" and "request_id", on /v2 the protocol's {"error"}); each case's status is one it may
get. Valid but unusual images are answered 200. After the corpus the server is still ready,
answers a normal request as it did before, and its resident memory stayed under a bound.
"""

from __future__ import annotations

import base64
import gzip
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hostile_corpus as hc
import httpx
import numpy as np
import orjson
import pytest
from serverproc import start_server, stop_server, wait_ready

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
MAX_BODY = 2 * MIB
MAX_PIXELS = 4_000_000
MAX_IMAGES = 8
RSS_BOUND = 1536 * MIB
ALL = "tiny-cbam,tiny-se,tiny-gc"
JSON = "application/json"
SERVER_SETTINGS = {
    "models": ALL,
    "cpu_threads": "1",
    "grpc_port": "0",
    "max_body_bytes": str(MAX_BODY),
    "max_image_pixels": str(MAX_PIXELS),
    "max_images_per_request": str(MAX_IMAGES),
}
SAFE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


@dataclass(frozen=True)
class Inputs:
    """The real images a case may send: a 28x28 MNIST digit (PNG) and a photo (JPEG)."""

    digit: bytes
    photo: bytes


@dataclass
class Req:
    """One request: through httpx, or `raw` bytes written to a socket (malformed HTTP)."""

    path: str = ""
    method: str = "POST"
    headers: dict[str, Any] = field(default_factory=dict)
    content: bytes | Callable[[], Iterator[bytes]] | None = None
    raw: bytes | None = None


@dataclass(frozen=True)
class Case:
    id: str
    expect: tuple[int, ...]
    build: Callable[[Inputs], Req]
    check: Callable[[httpx.Response | RawResponse], None] | None = None
    no_work: bool = False  # refused before any batch runs


@dataclass
class RawResponse:
    status_code: int
    headers: dict[str, str]
    content: bytes

    def json(self) -> Any:
        return orjson.loads(self.content)


# Request builders


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(path: str, data: Any, kind: str = "image/png") -> Req:
    return Req(path, headers={"content-type": kind}, content=data)


def v1(data: bytes, kind: str = "image/png", model: str = "tiny-gc", query: str = "") -> Req:
    return post(f"/v1/models/{model}/predict" + (f"?{query}" if query else ""), data, kind)


def v1_json(body: Any, model: str = "tiny-gc", query: str = "") -> Req:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return v1(data, "application/json", model, query)


def multipart(parts: list[tuple[str, str | None, str | None, bytes]], boundary: str = "xYz") -> Req:
    """A multipart/form-data predict body; each part (name, filename, content type, data)."""
    chunks = []
    for name, filename, kind, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        head += f"Content-Type: {kind}\r\n" if kind else ""
        chunks.append(head.encode() + b"\r\n" + data + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return v1(body, f"multipart/form-data; boundary={boundary}")


def image_input(images: list[bytes]) -> dict[str, Any]:
    data = [b64(i) for i in images]
    return {"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": data}


def v2(header: Any, model: str = "tiny-gc", suffix: str = "", **headers: str) -> Req:
    data = header if isinstance(header, bytes) else orjson.dumps(header)
    path = f"/v2/models/{model}{suffix}/infer"
    return Req(path, headers={"content-type": "application/json", **headers}, content=data)


def v2_binary(
    inputs: list[dict[str, Any]], binary: bytes, model: str = "tiny-gc", length: str | None = None
) -> Req:
    """The binary tensor data extension: JSON header, then `binary`."""
    header = orjson.dumps({"inputs": inputs})
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": length or str(len(header)),
    }
    return Req(f"/v2/models/{model}/infer", headers=headers, content=header + binary)


def join_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def binary_images(images: list[bytes], model: str = "tiny-gc") -> Req:
    raw = join_bytes(images)
    entry = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [len(images)],
        "parameters": {"binary_data_size": len(raw)},
    }
    return v2_binary([entry], raw, model)


def fp32_input(shape: list[int], values: np.ndarray) -> Req:
    raw = values.astype("<f4").tobytes()
    entry = {
        "name": "input",
        "datatype": "FP32",
        "shape": shape,
        "parameters": {"binary_data_size": len(raw)},
    }
    return v2_binary([entry], raw, "tiny-se")


def digit_tensor(data: Any, datatype: str = "FP32", shape: list[int] | None = None) -> Req:
    entry = {"name": "input", "datatype": datatype, "shape": shape or [1, 1, 64, 64], "data": data}
    return v2({"inputs": [entry]}, "tiny-se")


def get(path: str) -> Req:
    return Req(path, method="GET")


def raw(head: str, body: bytes = b"") -> Req:
    """`head` with CRLF line ends, then `body`; the path is taken from the request line."""
    path = head.split(" ")[1] if head.count(" ") > 1 else ""
    return Req(path, raw=head.replace("\n", "\r\n").encode() + body)


def chunks(total: int, size: int = 64 * 1024) -> Callable[[], Iterator[bytes]]:
    """A body streamed with Transfer-Encoding: chunked (no Content-Length)."""

    def generate() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            yield b"\x00" * min(size, total - sent)
            sent += size

    return generate


def nested(depth: int, leaf: str = "0") -> bytes:
    return ("[" * depth + leaf + "]" * depth).encode()


# Checks beyond the status


def answers_models(names: list[str]) -> Callable[[Any], None]:
    def check(response: Any) -> None:
        body = response.json()
        assert sorted(body["models"]) == sorted(names)
        assert [r["model"] for r in body["results"]] == body["models"]

    return check


def image_size(width: int, height: int) -> Callable[[Any], None]:
    def check(response: Any) -> None:
        assert response.json()["results"][0]["image"] == {"width": width, "height": height}

    return check


def batch_of(count: int) -> Callable[[Any], None]:
    def check(response: Any) -> None:
        outputs = {o["name"]: o for o in response.json()["outputs"]}
        assert outputs["probabilities"]["shape"] == [count, 10]

    return check


def mentions(*words: str) -> Callable[[Any], None]:
    def check(response: Any) -> None:
        body = response.json()
        text = str(body.get("detail", body.get("error"))).lower()
        assert all(w in text for w in words), text

    return check


def assert_short(response: Any, limit: int) -> None:
    """The answer does not echo a long input back."""
    assert len(response.content) < limit, len(response.content)


def fresh_request_id(sent: str | bytes) -> Callable[[Any], None]:
    def check(response: Any) -> None:
        echoed = response.headers["x-request-id"]
        assert echoed != (sent.decode("latin-1") if isinstance(sent, bytes) else sent)
        assert SAFE_ID.fullmatch(echoed)

    return check


def same_request_id(sent: str) -> Callable[[Any], None]:
    def check(response: Any) -> None:
        assert response.headers["x-request-id"] == sent
        if response.status_code >= 400:
            assert response.json()["request_id"] == sent

    return check


OK, BAD, NOT_FOUND, TOO_LARGE, MEDIA, INVALID = (200,), (400,), (404,), (413,), (415,), (422,)
TOLERATED = (200, 400)  # decoders that draw garbage data as pixels may answer either


def bomb(name: str, build: Callable[[Inputs], Req]) -> Case:
    """An image past the pixel limit: 413 naming the pixels, before any pixel is decoded."""
    return Case(name, TOO_LARGE, build, mentions("pixels"))


def image_cases() -> list[Case]:
    """Broken, lying and bomb images, one format at a time, through /v1 and /v2."""
    cases = []
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        kind = f"image/{fmt.lower()}"
        name = fmt.lower()

        def file(fmt: str = fmt) -> bytes:
            return hc.encoded(fmt)

        cases += [
            Case(f"{name}-truncated-half", BAD, lambda i, f=file, k=kind: v1(hc.truncated(f()), k)),
            Case(
                f"{name}-truncated-10pct",
                BAD,
                lambda i, f=file, k=kind: v1(hc.truncated(f(), 0.1), k),
            ),
            Case(
                f"{name}-corrupt-header",
                BAD,
                lambda i, f=file, k=kind: v1(hc.corrupted(f(), 0.0, 16), k),
            ),
            Case(
                f"{name}-corrupt-data",
                BAD if fmt in ("PNG", "GIF") else TOLERATED,
                lambda i, f=file, k=kind: v1(hc.corrupted(f()), k),
            ),
        ]
    cases += [
        Case("png-claims-1000x1000", BAD, lambda i: v1(hc.png_claiming(1000, 1000))),
        Case("bmp-claims-1000x1000", BAD, lambda i: v1(hc.bmp_claiming(1000, 1000), "image/bmp")),
        Case("gif-claims-1000x1000", BAD, lambda i: v1(hc.gif_claiming(1000, 1000), "image/gif")),
        Case("jpeg-claims-1000x1000", TOLERATED, lambda i: v1(hc.jpeg_claiming(1000, 1000))),
        Case("jpeg-claims-zero-width", BAD, lambda i: v1(hc.jpeg_claiming(0, 48), "image/jpeg")),
        Case("bmp-claims-negative-width", BAD + TOO_LARGE, lambda i: v1(hc.bmp_claiming(-5, 100))),
        bomb("bomb-png-header-100000x100000", lambda i: v1(hc.png_claiming(10**5, 10**5))),
        bomb("bomb-png-5000x5000-real", lambda i: v1(hc.png_bomb(5000))),
        bomb("bomb-gif-header-65535x65535", lambda i: v1(hc.gif_claiming(65535, 65535))),
        bomb("bomb-jpeg-header-65000x65000", lambda i: v1(hc.jpeg_claiming(65000, 65000))),
        bomb("bomb-bmp-header-60000x60000", lambda i: v1(hc.bmp_claiming(60000, 60000))),
        bomb("bomb-v2-binary", lambda i: binary_images([i.digit, hc.png_bomb(5000)])),
        bomb("bomb-v2-json", lambda i: v2({"inputs": [image_input([hc.png_bomb(3000)])]})),
        bomb("bomb-compare", lambda i: post("/v1/compare", hc.png_bomb(3000))),
        Case("empty-body", BAD, lambda i: v1(b"")),
        Case("random-bytes", BAD, lambda i: v1(np.random.default_rng(3).bytes(5000))),
        Case("svg-sent-as-png", BAD, lambda i: v1(b'<svg xmlns="http://www.w3.org/2000/svg"/>')),
        Case("html-sent-as-jpeg", BAD, lambda i: v1(b"<html><body>hi</body></html>", "image/jpeg")),
        Case(
            "v2-json-truncated-png",
            BAD,
            lambda i: v2({"inputs": [image_input([hc.truncated(i.digit)])]}),
        ),
        Case(
            "v2-binary-corrupt-gif", BAD, lambda i: binary_images([hc.corrupted(hc.encoded("GIF"))])
        ),
        Case(
            "compare-truncated-jpeg",
            BAD,
            lambda i: post("/v1/compare", hc.truncated(i.photo), "image/jpeg"),
        ),
        Case(
            "by-block-truncated-gif",
            BAD,
            lambda i: post(
                "/v1/predict?attention=cbam",
                hc.truncated(hc.encoded("GIF")),
                "image/gif",
            ),
        ),
    ]
    return cases


def body_cases() -> list[Case]:
    """Compressed, chunked, oversized and malformed bodies and HTTP."""
    host = "Host: 127.0.0.1\n"
    infer = "POST /v2/models/tiny-gc/infer HTTP/1.1\n" + host
    predict = "POST /v1/models/tiny-gc/predict HTTP/1.1\n" + host

    def encoded_v2(encoding: str, data: bytes) -> Req:
        return v2(data, **{"content-encoding": encoding})

    def valid_gzip(i: Inputs) -> Req:
        return encoded_v2("gzip", gzip.compress(orjson.dumps({"inputs": [image_input([i.digit])]})))

    return [
        Case("gzip-bomb-64MiB", TOO_LARGE, lambda i: encoded_v2("gzip", hc.gzip_bomb(64 * MIB))),
        Case(
            "deflate-bomb-64MiB",
            TOO_LARGE,
            lambda i: encoded_v2("deflate", hc.deflate_bomb(64 * MIB)),
        ),
        Case("gzip-truncated", BAD, lambda i: encoded_v2("gzip", hc.truncated(hc.gzip_bomb(MIB)))),
        Case("gzip-not-gzip", BAD, lambda i: encoded_v2("gzip", b'{"inputs": []}')),
        Case("gzip-trailing-data", BAD, lambda i: encoded_v2("gzip", hc.gzip_bomb(10) + b"xx")),
        Case("encoding-br-unsupported", MEDIA, lambda i: encoded_v2("br", b"{}")),
        Case("gzip-valid-json", OK, valid_gzip),
        Case(
            "v1-gzip-body-not-inflated",
            BAD,
            lambda i: Req(
                "/v1/models/tiny-gc/predict",
                headers={"content-type": "image/png", "content-encoding": "gzip"},
                content=gzip.compress(i.digit),
            ),
        ),
        Case(
            "v1-chunked-over-limit",
            TOO_LARGE,
            lambda i: post("/v1/models/tiny-gc/predict", chunks(MAX_BODY + MIB)),
        ),
        Case(
            "v2-chunked-over-limit",
            TOO_LARGE,
            lambda i: post("/v2/models/tiny-gc/infer", chunks(MAX_BODY + MIB), JSON),
        ),
        Case("v1-body-over-limit", TOO_LARGE, lambda i: v1(bytes(MAX_BODY + 1))),
        Case(
            "compare-body-over-limit",
            TOO_LARGE,
            lambda i: post("/v1/compare", bytes(3 * MIB)),
        ),
        Case(
            "v1-content-length-lie-1TB",
            TOO_LARGE,
            lambda i: raw(predict + "Content-Type: image/png\nContent-Length: 1000000000000\n\n"),
        ),
        Case(
            "v2-content-length-lie-1TB",
            TOO_LARGE,
            lambda i: raw(infer + "Content-Length: 1000000000000\n\n"),
        ),
        Case(
            "content-length-not-a-number", BAD, lambda i: raw(predict + "Content-Length: abc\n\n")
        ),
        Case(
            "content-length-and-chunked",
            BAD,
            lambda i: raw(
                predict + "Content-Length: 4\nTransfer-Encoding: chunked\n\n", b"0\r\n\r\n"
            ),
        ),
        Case("garbage-request-line", BAD, lambda i: raw("\x16\x03\x01 hello\n\n")),
        Case(
            "header-count-150",
            (431,),
            lambda i: raw(predict + "".join(f"X-Pad-{n}: {n}\n" for n in range(150)) + "\n"),
        ),
        Case("url-40KB", (431,), lambda i: v1(i.digit, query="top_k=3&" + "a" * 40_000)),
        Case(
            "query-20KB",
            INVALID,
            lambda i: v1(i.digit, query="top_k=3&" + "a" * 20_000),
            lambda response: assert_short(response, 2000),
        ),
        Case("model-name-5000-chars", NOT_FOUND, lambda i: v1(i.digit, model="m" * 5000)),
        Case("get-on-predict", (405,), lambda i: get("/v1/models/tiny-gc/predict")),
    ]


def form_cases() -> list[Case]:
    """Content types, multipart forms and JSON bodies on /v1."""
    tiny = hc.one_pixel

    def part(data: bytes, kind: str = "image/png", n: int = 0) -> tuple[str, str, str, bytes]:
        return ("images", f"img{n}.png", kind, data)

    return [
        Case("content-type-text-plain", MEDIA, lambda i: v1(i.digit, "text/plain")),
        Case(
            "content-type-missing",
            MEDIA,
            lambda i: Req("/v1/models/tiny-gc/predict", content=i.digit),
        ),
        Case(
            "content-type-urlencoded",
            MEDIA,
            lambda i: v1(b"top_k=3", "application/x-www-form-urlencoded"),
        ),
        Case("content-type-svg", MEDIA, lambda i: v1(b"<svg/>", "image/svg+xml")),
        Case("content-type-json-with-png", BAD, lambda i: v1(i.digit, "application/json")),
        Case("content-type-png-with-jpeg-bytes", OK, lambda i: v1(i.photo, "image/png")),
        Case(
            "multipart-part-text-html", MEDIA, lambda i: multipart([part(b"<b>x</b>", "text/html")])
        ),
        Case("multipart-no-boundary", BAD, lambda i: v1(i.digit, "multipart/form-data")),
        Case("multipart-no-file", BAD, lambda i: multipart([("top_k", None, None, b"3")])),
        Case("multipart-empty-file", BAD, lambda i: multipart([part(b"")])),
        Case(
            "multipart-9-files-over-limit",
            TOO_LARGE,
            lambda i: multipart([part(tiny(), n=n) for n in range(MAX_IMAGES + 1)]),
        ),
        Case(
            "multipart-1500-files",
            BAD + TOO_LARGE,
            lambda i: multipart([part(b"x", n=n) for n in range(1500)]),
        ),
        Case(
            "multipart-huge-text-field",
            BAD + TOO_LARGE + INVALID,
            lambda i: multipart([part(i.digit), ("top_k", None, None, b"1" * (MIB + 10))]),
        ),
        Case(
            "multipart-unknown-field",
            INVALID,
            lambda i: multipart([part(i.digit), ("colour", None, None, b"red")]),
        ),
        Case(
            "multipart-unterminated",
            BAD,
            lambda i: v1(
                b'--xYz\r\nContent-Disposition: form-data; name="images"; filename="a"\r\n\r\n'
                + i.digit,
                "multipart/form-data; boundary=xYz",
            ),
        ),
        Case("json-bad-base64", BAD, lambda i: v1_json({"images": ["not*base64!"]})),
        Case("json-base64-of-garbage", BAD, lambda i: v1_json({"images": [b64(b"garbage")]})),
        Case("json-array", BAD, lambda i: v1_json([b64(i.digit)])),
        Case("json-string", BAD, lambda i: v1_json(b64(i.digit))),
        Case("json-null", BAD, lambda i: v1_json(b"null")),
        Case("json-invalid", BAD, lambda i: v1_json(b'{"images": [')),
        Case("json-nested-3000", BAD, lambda i: v1_json(nested(3000))),
        Case("json-images-not-a-list", INVALID, lambda i: v1_json({"images": b64(i.digit)})),
        Case("json-images-empty", BAD + INVALID, lambda i: v1_json({"images": []})),
        Case("json-images-a-number", INVALID, lambda i: v1_json({"images": [12]})),
        Case(
            "json-9-images-over-limit",
            TOO_LARGE,
            lambda i: v1_json({"images": [b64(i.digit)] * (MAX_IMAGES + 1)}),
        ),
        Case(
            "json-top-k-1e30",
            INVALID,
            lambda i: v1_json(
                b'{"images": ["%s"], "top_k": 1000000000000000000000000000000}'
                % b64(i.digit).encode()
            ),
        ),
        Case(
            "json-top-k-1e400",
            BAD,
            lambda i: v1_json(b'{"images": ["%s"], "top_k": 1e400}' % b64(i.digit).encode()),
        ),
        Case(
            "json-top-k-true", INVALID, lambda i: v1_json({"images": [b64(i.digit)], "top_k": True})
        ),
        Case(
            "json-map-size-false",
            INVALID,
            lambda i: v1_json({"images": [b64(i.digit)], "map_size": False}),
        ),
        Case("json-maps-number", INVALID, lambda i: v1_json({"images": [b64(i.digit)], "maps": 1})),
        Case(
            "json-unknown-option", INVALID, lambda i: v1_json({"images": [b64(i.digit)], "topk": 3})
        ),
        Case(
            "query-unknown-option",
            INVALID,
            lambda i: v1(i.digit, query="topk=3"),
            mentions("unknown", "topk"),
        ),
        Case("query-top-k-true", INVALID, lambda i: v1(i.digit, query="top_k=true")),
        Case("query-top-k-negative", INVALID, lambda i: v1(i.digit, query="top_k=-1")),
        Case("query-map-size-huge", INVALID, lambda i: v1(i.digit, query="map_size=" + "9" * 40)),
        Case("query-map-size-nan", INVALID, lambda i: v1(i.digit, query="map_size=nan")),
    ]


def v2_cases() -> list[Case]:
    """/v2 inference headers and tensors that lie or break the protocol."""
    zeros = [0.0] * (64 * 64)

    def image_entry(i: Inputs, **changes: Any) -> dict[str, Any]:
        return {**image_input([i.digit]), **changes}

    def infer(i: Inputs, **changes: Any) -> Req:
        return v2({"inputs": [image_entry(i, **changes)]})

    def with_header(i: Inputs, **fields: Any) -> Req:
        return v2({"inputs": [image_input([i.digit])], **fields})

    def binary(i: Inputs, declared: int, extra: bytes = b"", length: str | None = None) -> Req:
        entry = {**image_input([]), "shape": [1], "parameters": {"binary_data_size": declared}}
        del entry["data"]
        return v2_binary([entry], join_bytes([i.digit]) + extra, length=length)

    nan = np.full((1, 1, 64, 64), np.nan)
    inf = np.zeros((1, 1, 64, 64))
    inf[0, 0, 3, 5] = np.inf
    return [
        Case("v2-body-array", BAD, lambda i: v2([image_input([i.digit])])),
        Case("v2-body-invalid-json", BAD, lambda i: v2(b'{"inputs": [')),
        Case("v2-body-nested-3000", BAD, lambda i: v2(nested(3000))),
        Case("v2-no-inputs", BAD, lambda i: v2({"outputs": []})),
        Case("v2-inputs-empty", BAD, lambda i: v2({"inputs": []})),
        Case("v2-input-not-object", BAD, lambda i: v2({"inputs": ["image"]})),
        Case("v2-shape-2-for-1-element", BAD, lambda i: infer(i, shape=[2])),
        Case("v2-shape-negative", BAD, lambda i: infer(i, shape=[-1])),
        Case("v2-shape-not-a-list", BAD, lambda i: infer(i, shape="1")),
        Case("v2-shape-boolean-dim", BAD, lambda i: infer(i, shape=[True])),
        Case("v2-shape-zero", BAD, lambda i: infer(i, shape=[0], data=[])),
        Case("v2-shape-2-dims-wrong", BAD, lambda i: infer(i, shape=[1, 2])),
        Case("v2-datatype-unknown", BAD, lambda i: infer(i, datatype="FP8")),
        Case("v2-datatype-missing", BAD, lambda i: infer(i, datatype=None)),
        Case("v2-datatype-number", BAD, lambda i: infer(i, datatype=7)),
        Case("v2-bytes-bad-base64", BAD, lambda i: infer(i, data=["%%%"])),
        Case("v2-bytes-number", BAD, lambda i: infer(i, data=[5])),
        Case("v2-two-inputs", BAD, lambda i: v2({"inputs": [image_input([i.digit])] * 2})),
        Case("v2-unknown-input-name", BAD, lambda i: infer(i, name="pixels")),
        Case(
            "v2-unknown-output",
            BAD,
            lambda i: with_header(i, outputs=[{"name": "attention/../../etc/passwd"}]),
        ),
        Case(
            "v2-binary-output-as-number",
            BAD,
            lambda i: with_header(i, parameters={"binary_data_output": 1}),
        ),
        Case(
            "v2-binary-data-as-string",
            BAD,
            lambda i: with_header(
                i, outputs=[{"name": "probabilities", "parameters": {"binary_data": "yes"}}]
            ),
        ),
        Case(
            "v2-classification-as-boolean",
            BAD,
            lambda i: with_header(
                i, outputs=[{"name": "probabilities", "parameters": {"classification": True}}]
            ),
        ),
        Case("v2-id-not-a-string", BAD, lambda i: with_header(i, id=12)),
        Case("v2-parameters-not-object", BAD, lambda i: with_header(i, parameters=[1])),
        Case(
            "v2-9-images-over-limit",
            TOO_LARGE,
            lambda i: v2({"inputs": [image_input([i.digit] * (MAX_IMAGES + 1))]}),
        ),
        Case("v2-fp32-wrong-shape", BAD, lambda i: digit_tensor(zeros * 3, shape=[1, 3, 64, 64])),
        Case("v2-fp32-data-short", BAD, lambda i: digit_tensor(zeros[:-1])),
        Case("v2-fp32-strings", BAD, lambda i: digit_tensor(["0"] * 4096)),
        Case(
            "v2-fp32-nested-100",
            BAD,
            lambda i: v2(
                b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": %s}]}'
                % nested(100),
                "tiny-se",
            ),
        ),
        Case(
            "v2-fp32-json-nan-literal",
            BAD,
            lambda i: v2(
                b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
                "tiny-se",
            ),
        ),
        Case("v2-fp32-overflow-1e39", BAD, lambda i: digit_tensor([1e39, *zeros[1:]])),
        Case("v2-fp32-binary-nan", BAD, lambda i: fp32_input([1, 1, 64, 64], nan)),
        Case("v2-fp32-binary-infinity", BAD, lambda i: fp32_input([1, 1, 64, 64], inf)),
        Case(
            "v2-fp32-huge-shape-16-bytes",
            BAD,
            lambda i: fp32_input([10**9, 1, 64, 64], np.zeros(4)),
        ),
        Case("v2-fp32-shape-2e40", BAD, lambda i: digit_tensor([0.0], shape=[2**40])),
        Case("v2-uint8-300", BAD, lambda i: digit_tensor([300] + [0] * 4095, "UINT8")),
        Case(
            "v2-int64-1e30",
            BAD,
            lambda i: v2(
                b'{"inputs": [{"name": "input", "datatype": "INT64", "shape": [1], '
                b'"data": [1000000000000000000000000000000]}]}',
                "tiny-se",
            ),
        ),
        Case("v2-binary-size-past-end", BAD, lambda i: binary(i, 10**6)),
        Case("v2-binary-size-negative", BAD, lambda i: binary(i, -4)),
        Case("v2-binary-bytes-unclaimed", BAD, lambda i: binary(i, len(i.digit) + 4, b"tail")),
        Case("v2-binary-size-short", BAD, lambda i: binary(i, 3)),
        Case(
            "v2-header-length-past-body",
            BAD,
            lambda i: binary(i, len(i.digit) + 4, length="999999"),
        ),
        Case("v2-header-length-zero", BAD, lambda i: binary(i, len(i.digit) + 4, length="0")),
        Case("v2-header-length-text", BAD, lambda i: binary(i, len(i.digit) + 4, length="ten")),
        Case("v2-header-length-short", BAD, lambda i: binary(i, len(i.digit) + 4, length="12")),
        Case(
            "v2-binary-and-data",
            BAD,
            lambda i: v2_binary(
                [{**image_input([i.digit]), "parameters": {"binary_data_size": 0}}], b""
            ),
        ),
        Case(
            "v2-bytes-length-prefix-truncated",
            BAD,
            lambda i: v2_binary(
                [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 2},
                    }
                ],
                b"\x10\x00",
            ),
        ),
    ]


def route_cases() -> list[Case]:
    """Unknown models, versions and blocks; path traversal; budgets; request IDs."""
    same_model_250 = ",".join(["tiny-cbam"] * 250)
    odd_ids: list[str | bytes] = [
        "<script>alert(1)</script>",
        "a b",
        "x" * 300,
        b"\xff\xfe\x80",
        "semi;colon",
    ]

    def with_id(i: Inputs, request_id: str | bytes, data: bytes | None = None) -> Req:
        req = v1(i.digit if data is None else data, model="tiny-se")
        req.headers["x-request-id"] = request_id
        return req

    cases = [
        Case("v1-unknown-model", NOT_FOUND, lambda i: v1(i.digit, model="nope")),
        Case("v1-unknown-version", NOT_FOUND, lambda i: v1(i.digit, query="version=99")),
        Case("v1-version-zero", INVALID, lambda i: v1(i.digit, query="version=0")),
        Case("v1-version-text", INVALID, lambda i: v1(i.digit, query="version=latest")),
        Case(
            "v1-traversal-encoded", NOT_FOUND, lambda i: v1(i.digit, model="..%2F..%2Fetc%2Fpasswd")
        ),
        Case("v1-traversal-dots", NOT_FOUND, lambda i: v1(i.digit, model="%2e%2e")),
        Case("v1-model-name-nul", NOT_FOUND, lambda i: v1(i.digit, model="tiny-gc%00")),
        Case(
            "by-block-unknown",
            NOT_FOUND,
            lambda i: post("/v1/predict?attention=transformer", i.digit, "image/png"),
        ),
        Case(
            "by-block-traversal",
            NOT_FOUND,
            lambda i: post("/v1/predict?attention=../../cbam", i.digit, "image/png"),
        ),
        Case(
            "by-block-missing",
            INVALID,
            lambda i: post("/v1/predict", i.digit, "image/png"),
        ),
        Case(
            "compare-unknown-model",
            NOT_FOUND,
            lambda i: post("/v1/compare?models=tiny-se,nope", i.digit, "image/png"),
        ),
        Case(
            "compare-same-model-250-times",
            OK,
            lambda i: post(f"/v1/compare?models={same_model_250}", i.digit, "image/png"),
            answers_models(["tiny-cbam"]),
        ),
        Case(
            "compare-only-commas",
            OK + BAD + INVALID,
            lambda i: post("/v1/compare?models=,,,", i.digit, "image/png"),
        ),
        Case(
            "compare-two-images",
            BAD + INVALID,
            lambda i: post("/v1/compare", orjson.dumps({"images": [b64(i.digit)] * 2}), JSON),
        ),
        Case(
            "budget-maps-all-512-8-images",
            TOO_LARGE,
            lambda i: v1_json(
                {"images": [b64(i.digit)] * MAX_IMAGES}, query="maps=all&map_size=512"
            ),
            mentions("budget"),
            no_work=True,
        ),
        Case(
            "budget-multipart-maps-all-512-8-photos",
            TOO_LARGE,
            lambda i: multipart(
                [("maps", None, None, b"all"), ("map_size", None, None, b"512")]
                + [("images", f"{n}.jpg", "image/jpeg", i.photo) for n in range(MAX_IMAGES)]
            ),
            mentions("budget"),
            no_work=True,
        ),
        Case(
            "v2-unknown-model",
            NOT_FOUND,
            lambda i: v2({"inputs": [image_input([i.digit])]}, "nope"),
        ),
        Case(
            "v2-unknown-version",
            NOT_FOUND,
            lambda i: v2({"inputs": [image_input([i.digit])]}, suffix="/versions/99"),
        ),
        Case(
            "v2-version-zero",
            NOT_FOUND,
            lambda i: v2({"inputs": [image_input([i.digit])]}, suffix="/versions/0"),
        ),
        Case(
            "v2-version-text",
            NOT_FOUND,
            lambda i: v2({"inputs": [image_input([i.digit])]}, suffix="/versions/latest"),
        ),
        Case(
            "v2-infer-traversal", NOT_FOUND, lambda i: v2({"inputs": []}, "..%2F..%2Fetc%2Fpasswd")
        ),
        Case("v2-metadata-unknown-model", NOT_FOUND, lambda i: get("/v2/models/nope")),
        Case(
            "v2-metadata-unknown-version", NOT_FOUND, lambda i: get("/v2/models/tiny-se/versions/7")
        ),
        Case(
            "v2-metadata-version-negative",
            NOT_FOUND,
            lambda i: get("/v2/models/tiny-se/versions/-1"),
        ),
        Case(
            "v2-metadata-traversal",
            NOT_FOUND,
            lambda i: get("/v2/models/%2e%2e%2f%2e%2e%2fetc%2fpasswd"),
        ),
        Case("v2-ready-unknown-model", NOT_FOUND, lambda i: get("/v2/models/nope/ready")),
        Case(
            "v2-ready-unknown-version",
            NOT_FOUND,
            lambda i: get("/v2/models/tiny-gc/versions/3/ready"),
        ),
        Case("v2-ready-version-1", OK, lambda i: get("/v2/models/tiny-gc/versions/1/ready")),
        Case("v2-metadata-long-name", NOT_FOUND, lambda i: get("/v2/models/" + "n" * 8000)),
        Case(
            "request-id-valid-echoed",
            OK,
            lambda i: with_id(i, "trace-42.a:b/c"),
            same_request_id("trace-42.a:b/c"),
        ),
        Case(
            "request-id-valid-on-error",
            BAD,
            lambda i: with_id(i, "err-7", hc.truncated(i.digit)),
            same_request_id("err-7"),
        ),
    ]
    for n, odd in enumerate(odd_ids):
        cases.append(
            Case(f"request-id-odd-{n}", OK, lambda i, o=odd: with_id(i, o), fresh_request_id(odd))
        )
    return cases


def valid_cases() -> list[Case]:
    """Valid but unusual images: every one is answered 200."""
    files = {
        "one-pixel": (hc.one_pixel, image_size(1, 1)),
        "strip-4000x3": (hc.wide_strip, image_size(4000, 3)),
        "png-16-bit": (hc.sixteen_bit_png, image_size(56, 40)),
        "png-palette-transparency": (hc.palette_png_with_transparency, image_size(64, 48)),
        "png-gray-alpha": (hc.gray_alpha_png, image_size(64, 48)),
        "jpeg-cmyk": (hc.cmyk_jpeg, image_size(64, 48)),
        "jpeg-exif-rotated": (hc.exif_rotated_jpeg, image_size(48, 64)),
        "gif-animated": (hc.animated_gif, image_size(64, 48)),
        "jpeg-progressive": (hc.progressive_jpeg, image_size(64, 48)),
        "png-at-pixel-limit": (lambda: hc.png_bomb(2000), image_size(2000, 2000)),
    }
    cases = []
    for name, (make, check) in files.items():
        cases.append(Case(f"valid-{name}-rgb", OK, lambda i, m=make: v1(m()), check))
        cases.append(
            Case(f"valid-{name}-gray", OK, lambda i, m=make: v1(m(), model="tiny-se"), check)
        )
    makers = [make for make, _ in files.values()]
    cases += [
        Case(
            "valid-v2-binary-unusual-batch",
            OK,
            lambda i: binary_images([m() for m in makers[:MAX_IMAGES]]),
            batch_of(MAX_IMAGES),
        ),
        Case(
            "valid-v2-json-unusual-batch",
            OK,
            lambda i: v2({"inputs": [image_input([m() for m in makers[-2:]])]}, "tiny-cbam"),
            batch_of(2),
        ),
        Case(
            "valid-compare-strip",
            OK,
            lambda i: post("/v1/compare", hc.wide_strip()),
            answers_models(["tiny-cbam", "tiny-se", "tiny-gc"]),
        ),
        Case(
            "valid-by-block-cmyk",
            OK,
            lambda i: post("/v1/predict?attention=se", hc.cmyk_jpeg(), "image/jpeg"),
        ),
    ]
    return cases


CASES = image_cases() + body_cases() + form_cases() + v2_cases() + route_cases() + valid_cases()


# The server, its memory, and the pass rule


class RssWatch:
    """Samples the server's resident memory (VmRSS) every 20 ms on a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.path = Path(f"/proc/{pid}/status")
        self.peak = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sample(self) -> int:
        try:
            text = self.path.read_text()
        except OSError:
            return self.peak
        kib = int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1))  # type: ignore[union-attr]
        self.peak = max(self.peak, kib * 1024)
        return self.peak

    def _run(self) -> None:
        while not self.stopped.wait(0.02):
            self.sample()

    def stop(self) -> int:
        self.stopped.set()
        self.thread.join(5)
        return self.sample()


@dataclass
class Server:
    url: str
    log: Path
    rss: RssWatch
    client: httpx.Client
    baseline: dict[str, Any]
    baseline_rss: int


def normal_request(client: httpx.Client, digit: bytes) -> httpx.Response:
    return client.post(
        "/v1/models/tiny-se/predict?top_k=10",
        content=digit,
        headers={"content-type": "image/png"},
    )


@pytest.fixture(scope="module")
def inputs(digits: list[tuple[int, bytes]], photo_files: dict[tuple[str, str], bytes]) -> Inputs:
    return Inputs(digit=digits[0][1], photo=photo_files[("chelsea", "jpeg")])


@pytest.fixture(scope="module")
def server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory, inputs: Inputs
) -> Iterator[Server]:
    """One server for the whole corpus, with small limits so that each one is cheap to reach."""
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    url, process = start_server(model_repository, log, **SERVER_SETTINGS)
    try:
        wait_ready(url, process)
        rss = RssWatch(process.pid)
        with httpx.Client(base_url=url, timeout=60) as client:
            response = normal_request(client, inputs.digit)
            assert response.status_code == 200, response.text
            yield Server(url, log, rss, client, response.json(), rss.sample())
        rss.stop()
    finally:
        stop_server(process)


def send_raw(url: str, data: bytes) -> RawResponse:
    """Write `data` to a fresh connection and read one HTTP answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer after {received!r}"
            received += chunk
        head, body = received.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        headers = {k.lower(): v for k, v in headers.items()}
        length = int(headers.get("content-length", 0))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed in the middle of the answer"
            body += chunk
    return RawResponse(int(lines[0].split()[1]), headers, body)


def send(server: Server, req: Req) -> httpx.Response | RawResponse:
    if req.raw is not None:
        return send_raw(server.url, req.raw)
    content = req.content() if callable(req.content) else req.content
    return server.client.request(req.method, req.path, headers=req.headers, content=content)


def batches_run(client: httpx.Client) -> float:
    """Batches the server has run, all models together (attnserve_batch_size_count)."""
    text = client.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("attnserve_batch_size_count")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def log_tail(server: Server, lines: int = 40) -> str:
    return "\n".join(server.log.read_text(errors="replace").splitlines()[-lines:])


def check_error_body(req: Req, response: httpx.Response | RawResponse) -> None:
    """A 4xx carries JSON with "error": {"error"} alone on /v2 paths; on /v1, "detail" too,
    and "request_id" (equal to the X-Request-ID header). The connection layer, answering
    before there is a request (malformed HTTP, oversized heads), writes {"error", "detail"}."""
    assert response.headers.get("content-type", "").startswith("application/json")
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]
    answered_by_app = "x-request-id" in response.headers
    if req.raw is None and response.status_code != 431:  # well-formed: the app answers
        assert answered_by_app, response.headers
    if req.path.startswith("/v2/") and answered_by_app:
        assert set(body) == {"error"}, body
    else:
        assert "detail" in body, body
        if answered_by_app:
            assert body["request_id"] == response.headers["x-request-id"], body


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case(server: Server, inputs: Inputs, case: Case) -> None:
    req = case.build(inputs)
    batches = batches_run(server.client) if case.no_work else 0
    response = send(server, req)
    status = response.status_code
    text = response.content[:500]
    assert status < 500, f"{case.id}: {status} {text!r}\nserver log:\n{log_tail(server)}"
    if 400 <= status < 500:
        check_error_body(req, response)
    assert status in case.expect, f"{case.id}: {status} {text!r}, expected one of {case.expect}"
    if case.check is not None:
        case.check(response)
    if case.no_work:
        assert batches_run(server.client) == batches, "a batch ran for a refused request"


def test_animated_gif_is_read_as_its_first_frame(server: Server) -> None:
    gif = hc.animated_gif()

    def answer(data: bytes) -> tuple[list[float], list[Any]]:
        response = server.client.post(
            "/v1/models/tiny-gc/predict?top_k=10",
            content=data,
            headers={"content-type": "image/png"},
        )
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        probs = sorted((p["index"], p["probability"]) for p in result["predictions"])
        return [p for _, p in probs], result["attention"]["summary"]["data"]

    probs, summary = answer(gif)
    first_probs, first_summary = answer(hc.gif_frame(gif, 0))
    np.testing.assert_allclose(probs, first_probs, atol=1e-5)
    np.testing.assert_allclose(summary, first_summary, atol=1e-3)
    _, other_summary = answer(hc.gif_frame(gif, 2))  # upside down: another map
    assert np.abs(np.subtract(summary, other_summary)).max() > 0.05


def test_server_survives_the_corpus(server: Server, inputs: Inputs) -> None:
    """Still ready, the same answer to a normal request as before the corpus, memory bounded."""
    assert server.client.get("/health/ready").status_code == 200
    assert server.client.get("/v2/health/ready").status_code == 200
    assert batches_run(server.client) > 0  # the no-work check above counts a real series
    response = normal_request(server.client, inputs.digit)
    assert response.status_code == 200, response.text
    before, after = server.baseline["results"][0], response.json()["results"][0]
    assert [p["index"] for p in after["predictions"]] == [p["index"] for p in before["predictions"]]
    np.testing.assert_allclose(
        [p["probability"] for p in after["predictions"]],
        [p["probability"] for p in before["predictions"]],
        atol=1e-4,
    )
    np.testing.assert_allclose(
        after["attention"]["summary"]["data"], before["attention"]["summary"]["data"], atol=2e-3
    )
    peak = server.rss.stop()
    print(f"server RSS: {server.baseline_rss / MIB:.0f} MiB after start, peak {peak / MIB:.0f} MiB")
    assert peak < RSS_BOUND, f"peak RSS {peak / MIB:.0f} MiB over {RSS_BOUND / MIB:.0f} MiB"
