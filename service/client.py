"""A small client for the /v1 API, for notebooks and scripts: predictions, maps as numpy arrays,
and the summary map over the image as a PIL image (drawn by `service.overlay`, as the server's
`map_format=overlay` is).

    from service.client import Client
    with Client("http://127.0.0.1:8000") as client:
        result = client.predict("examples/digit-7.png", model="digits-cbam", maps="layers")[0]
        result.predictions[0].label, result.summary.shape
        result.overlay("examples/digit-7.png").save("overlay.png")

`AsyncClient` has the same methods as coroutines. Both take an httpx transport, so they also
talk to an app in the same process (`httpx.ASGITransport`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np
from PIL import Image

from service.imaging import decode_image
from service.overlay import DEFAULT_COLORMAP, DEFAULT_OPACITY, overlay

__all__ = ["APIError", "AsyncClient", "Client", "Layer", "Prediction", "Result", "read_image"]

ImageInput = str | Path | bytes | Image.Image
DEFAULT_URL = "http://127.0.0.1:8000"


class APIError(Exception):
    """An error answer: HTTP status, the `error` code and its `detail`."""

    def __init__(self, status: int, error: str, detail: Any) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    index: int
    probability: float


@dataclass(frozen=True, slots=True)
class Layer:
    """One attention record of an answer (maps=layers or all); `values` as a numpy array."""

    layer: str
    block: str
    kind: str
    derived: bool
    values: np.ndarray


@dataclass(frozen=True, slots=True)
class Result:
    """One image's answer from one model. `summary` covers the whole original image (row 0 at
    the top); None with maps=none or for a model without attention. `raw`: the JSON object."""

    model: str
    predictions: list[Prediction]
    size: tuple[int, int] | None
    summary: np.ndarray | None
    layers: list[Layer] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def overlay(
        self,
        image: ImageInput,
        *,
        colormap: str = DEFAULT_COLORMAP,
        opacity: float = DEFAULT_OPACITY,
        max_side: int = 512,
        min_side: int = 0,
        legend: bool = True,
    ) -> Image.Image:
        """The summary map over `image` (the one that was sent), with a colour bar."""
        return overlay(
            read_image(image),
            self.summary,
            colormap=colormap,
            opacity=opacity,
            max_side=max_side,
            min_side=min_side,
            legend=legend,
        )


def read_image(image: ImageInput) -> Image.Image:
    """A path, encoded bytes or a PIL image as the upright PIL image the server sees (EXIF
    orientation applied, as the server does)."""
    if isinstance(image, Image.Image):
        return image
    data = Path(image).read_bytes() if isinstance(image, str | Path) else image
    return decode_image(data, max_pixels=2**62)


def _encoded(image: ImageInput) -> tuple[str, bytes, str]:
    """(file name, bytes, content type) of one multipart file part."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "image.png", buffer.getvalue(), "image/png"
    if isinstance(image, bytes):
        return "image", image, "application/octet-stream"
    path = Path(image)
    return path.name, path.read_bytes(), "application/octet-stream"


def _options(top_k: int, maps: str, map_size: int | None, **extra: Any) -> dict[str, Any]:
    options = {"top_k": top_k, "maps": maps, **extra}
    if map_size is not None:
        options["map_size"] = map_size
    return {key: value for key, value in options.items() if value is not None}


def _predict_request(
    images: ImageInput | Sequence[ImageInput], model: str | None, attention: str | None
) -> tuple[str, dict[str, Any], list[tuple[str, tuple[str, bytes, str]]]]:
    """(path, extra query, files) of a predict request."""
    if (model is None) == (attention is None):
        raise ValueError("give exactly one of model= or attention=")
    many = isinstance(images, Sequence) and not isinstance(images, str | bytes)
    batch = list(images) if many else [images]  # type: ignore[list-item, arg-type]
    files = [("image", _encoded(image)) for image in batch]
    if model is not None:
        return f"/v1/models/{model}/predict", {}, files
    return "/v1/predict", {"attention": attention}, files


def _parse(response: httpx.Response) -> list[Result]:
    """The answer's results; APIError for an error answer."""
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = {"error": "http_error", "detail": response.text}
        raise APIError(response.status_code, body.get("error", "?"), body.get("detail"))
    answer = response.json()
    return [_result(answer.get("model"), item) for item in answer["results"]]


def _result(model: str | None, item: dict[str, Any]) -> Result:
    attention = item.get("attention") or {}
    summary = attention.get("summary")
    image = item.get("image")
    predictions = [
        Prediction(p["label"], p["index"], p["probability"]) for p in item["predictions"]
    ]
    return Result(
        model=item.get("model", model) or "",
        predictions=predictions,
        size=None if image is None else (image["width"], image["height"]),
        summary=_array(summary),
        layers=[
            Layer(e["layer"], e["block"], e["kind"], e["derived"], _array(e))
            for e in attention.get("layers") or []
        ],
        raw=item,
    )


def _array(entry: dict[str, Any] | None) -> Any:
    if entry is None:
        return None
    if "data" in entry and entry["data"] is not None:
        return np.asarray(entry["data"], dtype=np.float32)
    return None  # a PNG map (map_format=png or overlay): only the JSON numbers are read


class Client:
    """Synchronous client of a running server."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(base_url=url, timeout=timeout, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def models(self) -> list[dict[str, Any]]:
        """The served models (GET /v1/models)."""
        response = self._http.get("/v1/models")
        if response.status_code >= 400:
            _parse(response)
        return list(response.json()["models"])

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        model: str | None = None,
        attention: str | None = None,
        top_k: int = 5,
        maps: str = "summary",
        map_size: int | None = None,
    ) -> list[Result]:
        """One result per image, from `model` (by name) or the model of block `attention`."""
        path, query, files = _predict_request(images, model, attention)
        params = {**query, **_options(top_k, maps, map_size)}
        return _parse(self._http.post(path, params=params, files=files))

    def compare(
        self,
        image: ImageInput,
        *,
        models: Sequence[str] | None = None,
        top_k: int = 5,
        maps: str = "summary",
        map_size: int | None = None,
    ) -> list[Result]:
        """One image through every served model (or `models`): one result per model."""
        params = _options(top_k, maps, map_size, models=",".join(models) if models else None)
        files = [("image", _encoded(image))]
        return _parse(self._http.post("/v1/compare", params=params, files=files))


class AsyncClient:
    """Asynchronous client: the methods of `Client` as coroutines."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout, transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def models(self) -> list[dict[str, Any]]:
        """The served models (GET /v1/models)."""
        response = await self._http.get("/v1/models")
        if response.status_code >= 400:
            _parse(response)
        return list(response.json()["models"])

    async def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        model: str | None = None,
        attention: str | None = None,
        top_k: int = 5,
        maps: str = "summary",
        map_size: int | None = None,
    ) -> list[Result]:
        """One result per image, from `model` (by name) or the model of block `attention`."""
        path, query, files = _predict_request(images, model, attention)
        params = {**query, **_options(top_k, maps, map_size)}
        return _parse(await self._http.post(path, params=params, files=files))

    async def compare(
        self,
        image: ImageInput,
        *,
        models: Sequence[str] | None = None,
        top_k: int = 5,
        maps: str = "summary",
        map_size: int | None = None,
    ) -> list[Result]:
        """One image through every served model (or `models`): one result per model."""
        params = _options(top_k, maps, map_size, models=",".join(models) if models else None)
        files = [("image", _encoded(image))]
        return _parse(await self._http.post("/v1/compare", params=params, files=files))
