"""/v2: the Open Inference Protocol (KServe v2) on the same models, batchers and imaging as /v1.

Inputs: "image" (BYTES, encoded image files, decoded and preprocessed exactly as /v1 does) or
"input" (FP32 normalised, or UINT8 pixels, shaped [N, C, H, W] like the model input). Every item
goes through the model's batcher, so v1 and v2 traffic share batches. Outputs: "probabilities",
"attention_summary" and, on request, "attention/<site>/<kind>"; the protocol has no explain verb,
so attention maps are extra named outputs.
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
from service.api.v2_codec import (
    HEADER_LENGTH,
    InputTensor,
    Requested,
    parse_request,
    read_infer_body,
)
from service.api.v2_outputs import (
    IMAGE,
    PROBABILITIES,
    SUMMARY,
    TENSOR,
    encode_outputs,
    has_summary,
    map_request,
    run_inputs,
    site_outputs,
)
from service.errors import BadRequest, NotReady, UnknownModel
from service.hosting import HostedModel
from service.state import Services, ServicesDep

__all__ = ["router"]

router = APIRouter(
    prefix="/v2",
    tags=["v2"],
    default_response_class=ORJSONResponse,
    responses=error_responses(V2Error, 400, 404, 503),
)

SERVER_NAME = "attnserve"
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "pytorch_attnserve"
VERSION = "1"
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
    """Inputs and outputs of a loaded model, -1 for variable dimensions; one version, "1"."""
    return ORJSONResponse(_metadata(_model(services, name, version)))


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
    services.ready_model(_model(services, name, version))
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
    hosted = _model(services, name, version)
    request.scope[MODEL_SCOPE_KEY] = hosted.name
    services.ready_model(hosted)
    pipeline = services.pipeline
    with pipeline.tracked():
        body = await read_infer_body(
            request, services.settings.max_body_bytes, services.settings.body_timeout_s
        )
        header, inputs = parse_request(body, request.headers.get(HEADER_LENGTH))
        head = _response_head(header, hosted.name, VERSION)
        wanted = _requested(header, hosted)
        work = run_inputs(pipeline, hosted, _single_input(inputs), map_request(wanted))
        results = await until_disconnect(request.receive, work)
        content, length = await pipeline.offload(encode_outputs, hosted, wanted, results, head)
    if length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(length)}
    )


def _model(services: Services, name: str, version: str | None) -> HostedModel:
    hosted = services.registry.get(name)
    if version is not None and version != VERSION:
        raise UnknownModel(f"model {name!r} has no version {version!r}; versions: [{VERSION!r}]")
    return hosted


def _tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def _metadata(hosted: HostedModel) -> dict[str, Any]:
    if hosted.config is None:
        raise NotReady(f"model {hosted.name!r} is {hosted.status}; metadata once it is loaded")
    config = hosted.config
    channels, height, width = config.input_size
    outputs = [_tensor(PROBABILITIES, "FP32", [-1, len(config.labels)])]
    if has_summary(hosted):
        outputs.append(_tensor(SUMMARY, "FP32", [-1, -1, -1]))
    outputs += [_tensor(n, "FP32", [-1] * rank) for n, rank in site_outputs(hosted).items()]
    return {
        "name": hosted.name,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [
            _tensor(IMAGE, "BYTES", [-1]),
            _tensor(TENSOR, "FP32", [-1, channels, height, width]),
        ],
        "outputs": outputs,
        "parameters": {
            "arch": hosted.source.arch,
            "attention": hosted.attention,
            "mean": ",".join(map(str, config.mean)),
            "std": ",".join(map(str, config.std)),
        },
    }


def _parameters(entry: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"the parameters of {where} must be an object")
    return parameters


def _flag(parameters: dict[str, Any], key: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter {key!r} must be true or false, got {value!r}")
    return value


def _parse_outputs(header: dict[str, Any]) -> tuple[list[Requested] | None, bool]:
    """The outputs asked for (None when the request lists none) and the request's binary default."""
    binary = _flag(_parameters(header, "the request"), "binary_data_output", False)
    entries = header.get("outputs")
    if not entries:
        return None, binary
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BadRequest('"outputs" must be a list of objects with a "name"')
    wanted: list[Requested] = []
    for entry in entries:
        name = entry.get("name")
        if not isinstance(name, str) or any(r.name == name for r in wanted):
            raise BadRequest(f"every output needs a distinct string name; got {name!r} again")
        parameters = _parameters(entry, f"output {name!r}")
        classes = parameters.get("classification", 0)
        if type(classes) is not int or classes < 0:
            raise BadRequest(f"classification must be a non-negative integer, got {classes!r}")
        wanted.append(Requested(name, _flag(parameters, "binary_data", binary), classes))
    return wanted, binary


def _response_head(header: dict[str, Any], model: str, version: str) -> dict[str, Any]:
    """The response's model name and version, with the request's "id" echoed."""
    head: dict[str, Any] = {"model_name": model, "model_version": version}
    if "id" in header:
        if not isinstance(header["id"], str):
            raise BadRequest('the request "id" must be a string')
        head["id"] = header["id"]
    return head


def _requested(header: dict[str, Any], hosted: HostedModel) -> list[Requested]:
    """The outputs asked for (every default one when none are), checked against the model."""
    defaults = [PROBABILITIES, *([SUMMARY] if has_summary(hosted) else [])]
    wanted, binary = _parse_outputs(header)
    if wanted is None:
        return [Requested(name, binary) for name in defaults]
    available = defaults + list(site_outputs(hosted))
    for request in wanted:
        if request.name not in available:
            raise BadRequest(
                f"model {hosted.name!r} has no output {request.name!r}; outputs: {available}"
            )
        if request.classes and request.name != PROBABILITIES:
            raise BadRequest(
                f"classification applies to {PROBABILITIES!r} only, not {request.name!r}"
            )
    return wanted


def _single_input(inputs: list[InputTensor]) -> InputTensor:
    if len(inputs) != 1 or inputs[0].name not in (IMAGE, TENSOR):
        names = [t.name for t in inputs]
        raise BadRequest(
            f"send exactly one input, {IMAGE!r} (BYTES, encoded images) or {TENSOR!r} "
            f"(FP32 or UINT8 [N, C, H, W]); got {names}"
        )
    return inputs[0]
