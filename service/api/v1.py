"""/v1 routes: list the models, predict with one (by name or by attention block), compare all."""

from __future__ import annotations

import functools
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ConfigDict, ValidationError

from service.api.fast import PlainRoute
from service.api.handlers import ORJSONResponse
from service.api.inputs import (
    ACCEPTED_CONTENT_TYPES,
    JSON,
    MULTIPART,
    JsonPredictBody,
    PredictOptions,
    read_payload,
)
from service.errors import InvalidOptions
from service.maps import MapOptions
from service.registry import HostedModel
from service.state import Services, ServicesDep

__all__ = ["MODEL_SCOPE_KEY", "fast_routes", "router"]

router = APIRouter(prefix="/v1", tags=["v1"], default_response_class=ORJSONResponse)

MODEL_SCOPE_KEY = "attnserve.model"

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_OPTION_SCHEMAS = PredictOptions.model_json_schema()["properties"]
_BODY_DOC: dict[str, Any] = {
    # The options are read from the query string by `query_options` (validated once per
    # distinct query string instead of by FastAPI's per-request parameter model), so they are
    # documented here.
    "parameters": [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": field.description,
            "schema": _OPTION_SCHEMAS[name],
        }
        for name, field in PredictOptions.model_fields.items()
    ],
    "requestBody": {
        "required": True,
        "content": {
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": _BINARY["schema"]}},
                }
            },
            JSON: {"schema": JsonPredictBody.model_json_schema()},
            **{kind: _BINARY for kind in ACCEPTED_CONTENT_TYPES if kind.startswith("image/")},
        },
    },
}


class _StrictOptions(PredictOptions):
    model_config = ConfigDict(extra="forbid")


def query_options(request: Request) -> PredictOptions:
    """The options in the request's query string (other parameters ignored); 422 if invalid."""
    return _parse_query(request.scope.get("query_string", b""))


@functools.lru_cache(maxsize=256)
def _parse_query(query_string: bytes) -> PredictOptions:
    """Cached per query string: the returned model is shared, so callers must not modify it."""
    pairs = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
    try:
        return PredictOptions.model_validate(pairs)
    except ValidationError as exc:
        errors = [{**error, "loc": ("query", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from None


def _merge(query: PredictOptions, body: dict[str, Any]) -> MapOptions:
    """Query options overridden by those in the body (form fields or JSON keys); 422 if invalid."""
    if not body:
        return query.to_map_options()
    merged = {**query.model_dump(exclude_unset=True), **body}
    return _StrictOptions.model_validate(merged).to_map_options()


async def _predict(
    request: Request, services: Services, hosted: HostedModel, query: PredictOptions
) -> ORJSONResponse:
    request.scope[MODEL_SCOPE_KEY] = hosted.name
    services.ready_model(hosted)
    settings = services.settings
    payload = await read_payload(
        request,
        max_body_bytes=settings.max_body_bytes,
        max_images=settings.max_images_per_request,
    )
    options = _merge(query, payload.options)
    results = await services.predictor.predict(hosted, payload.images, options, request.receive)
    return ORJSONResponse({"model": hosted.name, "results": results})


@router.get("/models", summary="List the served models")
async def list_models(services: ServicesDep) -> ORJSONResponse:
    """Every served model: labels, input size, attention sites, status, random_weights."""
    return ORJSONResponse({"models": [m.info() for m in services.registry.models.values()]})


@router.post("/models/{name}/predict", summary="Classify images", openapi_extra=_BODY_DOC)
async def predict(name: str, request: Request) -> ORJSONResponse:
    """Predictions and attention maps for each image, from model `name`."""
    # Documents the route in OpenAPI; requests reach `_serve_predict` through `fast_routes`.
    return await _serve_predict(request)


async def _serve_predict(request: Request) -> ORJSONResponse:
    services: Services = request.app.state.services
    hosted = services.registry.get(request.path_params["name"])
    return await _predict(request, services, hosted, query_options(request))


# Served by a plain route ahead of the routers (service/api/fast.py).
fast_routes = [PlainRoute("/v1/models/{name}/predict", _serve_predict, methods=["POST"])]


@router.post("/predict", summary="Classify with a block's model", openapi_extra=_BODY_DOC)
async def predict_by_block(
    attention: Annotated[str, Query(description="Attention block, e.g. cbam.")],
    request: Request,
    services: ServicesDep,
) -> ORJSONResponse:
    """Like /v1/models/{name}/predict, with the model chosen by its block (see block_routes)."""
    hosted = services.registry.for_block(attention)
    return await _predict(request, services, hosted, query_options(request))


@router.post("/compare", summary="One image through several models", openapi_extra=_BODY_DOC)
async def compare(
    request: Request,
    services: ServicesDep,
    models: Annotated[str | None, Query(description="Comma-separated names; default all.")] = None,
) -> ORJSONResponse:
    """The same image through every served model (or `models`), results side by side."""
    options = query_options(request)
    registry = services.registry
    names = [n.strip() for n in models.split(",") if n.strip()] if models else list(registry.models)
    hosted = [services.ready_model(registry.get(name)) for name in names]
    settings = services.settings
    payload = await read_payload(
        request, max_body_bytes=settings.max_body_bytes, max_images=settings.max_images_per_request
    )
    if len(payload.images) != 1:
        raise InvalidOptions(f"compare takes exactly one image, got {len(payload.images)}")
    map_options = _merge(options, payload.options)
    predictor = services.predictor
    results = await predictor.compare(hosted, payload.images[0], map_options, request.receive)
    return ORJSONResponse({"models": names, "results": results})
