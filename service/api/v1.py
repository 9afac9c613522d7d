"""/v1 routes: list the models, predict with one (by name or by attention block), compare all.

Each route parses its request into a pipeline call and encodes the results (`service.api.encode`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from service.api.encode import Sources, encode_compare, encode_predict
from service.api.handlers import ORJSONResponse
from service.api.inputs import ACCEPTED_CONTENT_TYPES, JSON, MULTIPART, read_payload
from service.api.requests import MODEL_SCOPE_KEY, until_disconnect
from service.api.schemas import (
    CompareResponse,
    ErrorBody,
    JsonPredictBody,
    ModelsResponse,
    PredictOptions,
    PredictResponse,
    StrictOptions,
    error_responses,
    inline_schema,
)
from service.budget import PREDICTION_BYTES, result_cost
from service.errors import InvalidOptions
from service.hosting import HostedModel
from service.state import Services, ServicesDep

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["v1"])

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_IMAGES_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {"type": "array", "items": _BINARY["schema"], "minItems": 1}
                    },
                }
            },
            JSON: {"schema": inline_schema(JsonPredictBody)},
            **{kind: _BINARY for kind in ACCEPTED_CONTENT_TYPES if kind.startswith("image/")},
        },
    },
}
_ERRORS = error_responses(ErrorBody, 400, 404, 413, 415, 422, 503, 504)
Options = Annotated[PredictOptions, Query()]
_ROUTE_QUERY = {"version", "attention", "models"}  # the routes' own query parameters


async def _read(
    request: Request, services: Services, query: PredictOptions
) -> tuple[list[bytes], PredictOptions]:
    """The request's images, and the query options overridden by those in the body (form
    fields or JSON keys; 422 if invalid or unknown)."""
    unknown = sorted(set(request.query_params) - set(PredictOptions.model_fields) - _ROUTE_QUERY)
    if unknown:
        shown = [name[:40] for name in unknown[:5]]  # never echo a long input back
        raise InvalidOptions(
            f"unknown query option(s) {shown}; options: {sorted(PredictOptions.model_fields)}"
        )
    settings = services.settings
    payload = await read_payload(
        request,
        max_body_bytes=settings.max_body_bytes,
        max_images=settings.max_images_per_request,
        body_timeout_s=settings.body_timeout_s,
    )
    if not payload.options:
        return payload.images, query
    merged = {**query.model_dump(exclude_unset=True), **payload.options}
    return payload.images, StrictOptions.model_validate(merged)


def _check_budget(
    services: Services, models: list[HostedModel], images: int, options: PredictOptions
) -> None:
    """413 before any work when the request exceeds the map-cell or answer-size budget."""
    maps = options.map_request()
    side = services.settings.overlay_max_side
    costs = [
        result_cost(
            m.map_counts,
            maps,
            head_bytes=options.top_k * PREDICTION_BYTES,
            image_format=options.map_format,
            overlay_side=side,
        )
        for m in models
    ]
    services.pipeline.check_budget(costs, images)


@router.get("/models", summary="List the served models", response_model=ModelsResponse)
async def list_models(services: ServicesDep) -> ORJSONResponse:
    """Every served model: labels, input size, attention sites, status, random_weights."""
    return ORJSONResponse({"models": [m.info() for m in services.registry.models.values()]})


@router.post(
    "/models/{name}/predict",
    summary="Classify images",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra=_IMAGES_BODY,
)
async def predict(
    name: str,
    options: Options,
    request: Request,
    services: ServicesDep,
    version: Annotated[int | None, Query(ge=1, description="Default: highest ready.")] = None,
) -> Response:
    """Predictions and attention maps for each image, from model `name` (or its `version`)."""
    return await _predict(request, services, services.registry.get(name, version), options)


@router.post(
    "/predict",
    summary="Classify with a block's model",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra=_IMAGES_BODY,
)
async def predict_by_block(
    attention: Annotated[str, Query(description="Attention block, e.g. cbam.")],
    options: Options,
    request: Request,
    services: ServicesDep,
) -> Response:
    """Like /v1/models/{name}/predict, with the model chosen by its block (see block_routes)."""
    return await _predict(request, services, services.registry.for_block(attention), options)


async def _predict(
    request: Request, services: Services, hosted: HostedModel, query: PredictOptions
) -> Response:
    request.scope[MODEL_SCOPE_KEY] = hosted.name
    with services.serving(hosted) as pipeline:
        images, options = await _read(request, services, query)
        _check_budget(services, [hosted], len(images), options)
        work = pipeline.predict(hosted, images, options.map_request())
        results = await until_disconnect(request.receive, work)
        labels = hosted.data_config.labels
        sources = Sources(images, services.settings.overlay_max_side)
        body = await pipeline.encode(encode_predict, hosted.name, results, labels, options, sources)
    return Response(body, media_type="application/json")


@router.post(
    "/compare",
    summary="One image through several models",
    response_model=CompareResponse,
    responses=_ERRORS,
    openapi_extra=_IMAGES_BODY,
)
async def compare(
    options: Options,
    request: Request,
    services: ServicesDep,
    models: Annotated[str | None, Query(description="Comma-separated names; default all.")] = None,
) -> Response:
    """The same image through every served model (or `models`), results side by side."""
    registry = services.registry
    listed = [n.strip() for n in models.split(",")] if models else list(registry.models)
    names = list(dict.fromkeys(n for n in listed if n))  # each model once, in listed order
    hosted = [services.ready_model(registry.get(name)) for name in names]
    pipeline = services.pipeline
    with pipeline.tracked():
        images, merged = await _read(request, services, options)
        if len(images) != 1:
            raise InvalidOptions(f"compare takes exactly one image, got {len(images)}")
        _check_budget(services, hosted, 1, merged)
        work = pipeline.compare(hosted, images[0], merged.map_request())
        results = await until_disconnect(request.receive, work)
        labels = [m.data_config.labels for m in hosted]
        sources = Sources(images, services.settings.overlay_max_side)
        body = await pipeline.encode(encode_compare, names, results, labels, merged, sources)
    return Response(body, media_type="application/json")
