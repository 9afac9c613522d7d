"""Pydantic models of the HTTP API's requests, answers and errors: the OpenAPI document's schemas.

The inference routes encode their answers with orjson in the CPU pool; these models describe
exactly what that encoding writes, so the generated document is a contract a client (or a
schema-driven fuzzer) can check every answer against.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.maps import MapRequest

__all__ = [
    "CompareResponse",
    "ErrorBody",
    "ModelsResponse",
    "PredictOptions",
    "PredictResponse",
    "ReadyResponse",
    "V2Error",
    "error_responses",
    "inline_schema",
]


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
    map_format: Literal["json", "png", "overlay"] = Field(
        "json",
        description="json number arrays; png: base64 PNG heatmaps for 2-D maps; overlay: as "
        "png, and the summary also blended over the image as a PNG with a colour bar.",
    )
    colormap: Literal["viridis", "inferno", "berlin"] = Field(
        "viridis",
        description="Colour scale of png and overlay maps (berlin is diverging, centred on 0).",
    )

    @field_validator("top_k", "map_size", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        """JSON true is not the number 1 (pydantic's lax mode would read it so)."""
        if isinstance(value, bool):
            raise ValueError("must be an integer, not a boolean")
        return value

    def map_request(self) -> MapRequest:
        return MapRequest(self.maps, self.map_size)


class StrictOptions(PredictOptions):
    """Options from a request body (form fields or JSON keys): unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


class JsonPredictBody(StrictOptions):
    """The JSON request form: base64 images plus any option."""

    images: list[str] = Field(
        min_length=1, description="Base64-encoded image files (data: URLs accepted)."
    )


class Prediction(BaseModel):
    label: str
    index: int
    probability: float


class ImageSize(BaseModel):
    width: int
    height: int


class MapEntry(BaseModel):
    """A map: its shape and its numbers (3 decimals), or for 2-D maps with map_format=png a
    base64 PNG heatmap and the value range its colour scale spans."""

    shape: list[int]
    data: list[Any] | None = Field(None, description="Nested lists of numbers, row-major.")
    png: str | None = None
    range: list[float] | None = None
    overlay: str | None = Field(
        None, description="map_format=overlay, summary only: base64 PNG over the image."
    )


class LayerEntry(MapEntry):
    layer: str = Field(description="The attention site (module path).")
    block: str
    kind: str = Field(description="Record kind: channel, spatial, context, coord_h, ...")
    derived: bool = Field(description="A view derived from the block's gates, not a gate.")


class Attention(BaseModel):
    summary: MapEntry | None
    layers: list[LayerEntry] | None = Field(None, description="maps=layers and maps=all only.")


class ImageAnswer(BaseModel):
    predictions: list[Prediction]
    image: ImageSize
    attention: Attention | None


class PredictResponse(BaseModel):
    model: str
    results: list[ImageAnswer]


class CompareAnswer(ImageAnswer):
    model: str


class CompareResponse(BaseModel):
    models: list[str]
    results: list[CompareAnswer]


class Site(BaseModel):
    site: str
    block: str
    kinds: list[str]


class ModelInfo(BaseModel):
    name: str
    arch: str
    attention: str
    status: str
    random_weights: bool
    labels: list[str] | None
    input_size: list[int] | None
    sites: list[Site]


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class ModelState(BaseModel):
    status: str
    error: str | None
    queue_depth: int


class ReadyResponse(BaseModel):
    status: str
    models: dict[str, ModelState]


class NotReadyResponse(BaseModel):
    error: str
    detail: Any
    models: dict[str, ModelState]


class ErrorBody(BaseModel):
    """Every /v1 and health error: a code and what to fix (422: one entry per problem)."""

    error: str
    detail: Any
    request_id: str | None = Field(None, description="The request's X-Request-ID.")


class V2Error(BaseModel):
    """Every /v2 error, as the Open Inference Protocol defines it."""

    error: str


_MEANING = {
    400: "The request is malformed.",
    404: "No such model (or version).",
    413: "Too many bytes, pixels or images.",
    415: "Unsupported content type.",
    422: "Invalid options.",
    503: "Not ready, queue full or shutting down (see Retry-After).",
    504: "The model did not answer within the request timeout.",
}


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its nested definitions written in place, for request bodies
    given through openapi_extra (where "#/$defs/..." would point nowhere)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return dict(resolve(schema))


def error_responses(model: type[BaseModel], *codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route: each status code it can return, with the error schema."""
    return {code: {"model": model, "description": _MEANING[code]} for code in codes}


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


_DATATYPES = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip


class InferInput(BaseModel):
    name: str = Field(description='"image" (BYTES, encoded files) or "input" (FP32/UINT8).')
    datatype: _DATATYPES
    shape: list[int] = Field(min_length=1)
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="Row-major values (or binary_data_size).")


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """The JSON request of the Open Inference Protocol (a binary body: this header first)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(min_length=1, max_length=1)
    outputs: list[InferRequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]
