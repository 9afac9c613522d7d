"""/v2: the Open Inference Protocol (KServe v2) on the same models, batchers and imaging as /v1.

Inputs: "image" (BYTES, encoded image files, decoded and preprocessed exactly as /v1 does) or
"input" (FP32 normalised, or UINT8 pixels, shaped [N, C, H, W] like the model input). Every item
goes through the model's batcher, so v1 and v2 traffic share batches. Outputs: "probabilities",
"attention_summary" and, on request, "attention/<site>/<kind>"; the protocol has no explain verb,
so attention maps are extra named outputs. Every model route also takes `/versions/{v}`; without
it a request goes to the model's highest ready version.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service.api.handlers import ORJSONResponse
from service.api.requests import MODEL_SCOPE_KEY, until_disconnect
from service.api.schemas import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    V2Error,
    error_responses,
    inline_schema,
)
from service.api.v2_codec import HEADER_LENGTH, parse_request, read_infer_body
from service.api.v2_model import (
    EXTENSIONS,
    SERVER_NAME,
    metadata,
    requested,
    response_head,
    single_input,
)
from service.api.v2_outputs import encode_outputs, map_request, run_inputs
from service.errors import NotReady, UnknownModel
from service.hosting import HostedModel
from service.state import Services, ServicesDep

__all__ = ["router"]

router = APIRouter(
    prefix="/v2",
    tags=["v2"],
    default_response_class=ORJSONResponse,
    responses=error_responses(V2Error, 400, 404, 503),
)

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_schema(InferenceRequest)},
            "application/octet-stream": _BINARY,
        },
    },
}
_INFER_RESPONSES = {
    200: {"model": InferenceResponse, "content": {"application/octet-stream": _BINARY}},
    **error_responses(V2Error, 413, 415, 504),
}


@router.get("", summary="Server metadata", response_model=ServerMetadata)
async def server_metadata(request: Request) -> ORJSONResponse:
    """Name, version and the protocol extensions this server speaks."""
    body = {"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS}
    return ORJSONResponse(body)


@router.get("/health/live", summary="Server live", response_model=ServerLive)
async def live() -> ORJSONResponse:
    """200 while the process answers."""
    return ORJSONResponse({"live": True})


@router.get("/health/ready", summary="Server ready", response_model=ServerReady)
async def ready(services: ServicesDep) -> ORJSONResponse:
    """200 once every model is loaded and warm (the truth of /health/ready); else 503."""
    is_ready, reason = await services.readiness()
    if not is_ready:
        raise NotReady(reason)
    return ORJSONResponse({"ready": True})


@router.get("/models/{name}", summary="Model metadata", response_model=ModelMetadata)
@router.get(
    "/models/{name}/versions/{version}",
    summary="Model metadata (version)",
    response_model=ModelMetadata,
)
async def model_metadata(
    name: str, services: ServicesDep, version: str | None = None
) -> ORJSONResponse:
    """Inputs and outputs of a loaded model version, -1 for variable dimensions."""
    hosted = model_version(services, name, version)
    return ORJSONResponse(metadata(hosted, sorted(services.registry.versions[name])))


@router.get("/models/{name}/ready", summary="Model ready", response_model=ModelReady)
@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Model ready (version)",
    response_model=ModelReady,
)
async def model_ready(
    name: str, services: ServicesDep, version: str | None = None
) -> ORJSONResponse:
    """200 when the model takes requests; 503 with the reason otherwise."""
    services.ready_model(model_version(services, name, version))
    return ORJSONResponse({"name": name, "ready": True})


@router.post(
    "/models/{name}/infer",
    summary="Inference",
    openapi_extra=_INFER_DOC,
    responses=_INFER_RESPONSES,
)
@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference (version)",
    openapi_extra=_INFER_DOC,
    responses=_INFER_RESPONSES,
)
async def infer(
    name: str, request: Request, services: ServicesDep, version: str | None = None
) -> Response:
    """Probabilities and attention maps for a batch of encoded images or model-ready tensors."""
    hosted = model_version(services, name, version)
    request.scope[MODEL_SCOPE_KEY] = hosted.name
    with services.serving(hosted) as pipeline:
        body = await read_infer_body(
            request, services.settings.max_body_bytes, services.settings.body_timeout_s
        )
        header, inputs = parse_request(body, request.headers.get(HEADER_LENGTH))
        head = response_head(header, hosted.name, hosted.version)
        wanted = requested(header, hosted)
        work = run_inputs(pipeline, hosted, single_input(inputs), map_request(wanted))
        results = await until_disconnect(request.receive, work)
        content, length = await pipeline.encode(encode_outputs, hosted, wanted, results, head)
    if length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(length)}
    )


def model_version(services: Services, name: str, version: str | None) -> HostedModel:
    """The model's version `version` (a path segment), or its default one; 404 if unknown."""
    if version is None:
        return services.registry.get(name)
    if not version.isdigit() or int(version) < 1:
        raise UnknownModel(f"model {name!r} has no version {version!r}; versions are 1, 2, ...")
    return services.registry.get(name, int(version))
