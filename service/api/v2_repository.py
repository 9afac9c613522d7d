"""/v2 model management: the repository extension (index, load, unload), model configuration
and the statistics extension, in the shapes Triton answers them.

Load and unload work in explicit model control mode (`ATTNSERVE_MODEL_CONTROL_MODE`); a load
request may carry a config override, `{"parameters": {"config": "<JSON model config>"}}`.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request

from service.api.handlers import ORJSONResponse
from service.api.schemas import V2Error, error_responses
from service.api.v2 import model_version
from service.api.v2_model import model_config, statistics
from service.control import ModelControl
from service.errors import BadRequest, NotReady
from service.state import Services, ServicesDep

__all__ = ["router"]

router = APIRouter(
    prefix="/v2",
    tags=["v2"],
    default_response_class=ORJSONResponse,
    responses=error_responses(V2Error, 400, 404, 503),
)


async def _body(request: Request) -> dict[str, Any]:
    """The optional JSON object of a repository request ({} when empty)."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _control(services: Services) -> ModelControl:
    services.check_accepting()
    if services.control is None:
        raise NotReady("the service is starting")
    return services.control


@router.post("/repository/index", summary="Repository index")
async def repository_index(request: Request, services: ServicesDep) -> ORJSONResponse:
    """Every model version in the repository or loaded: name, version, state, reason.
    `{"ready": true}` lists the ready ones only."""
    ready = (await _body(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise BadRequest(f'"ready" must be true or false, got {ready!r}')
    return ORJSONResponse(await _control(services).index(ready))


@router.post("/repository/models/{name}/load", summary="Load a model")
async def load(name: str, request: Request, services: ServicesDep) -> ORJSONResponse:
    """Load (or reload what changed of) a model; 200 once a version of it serves."""
    parameters = (await _body(request)).get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest('"parameters" must be an object')
    config = parameters.get("config")
    if config is not None and not isinstance(config, str):
        raise BadRequest('the "config" parameter must be a string holding JSON')
    await _control(services).load(name, config)
    return ORJSONResponse({})


@router.post("/repository/models/{name}/unload", summary="Unload a model")
async def unload(name: str, request: Request, services: ServicesDep) -> ORJSONResponse:
    """Unload every version of a model: new requests get 503 while the admitted ones finish,
    then 404."""
    await _body(request)
    await _control(services).unload(name)
    return ORJSONResponse({})


@router.get("/models/stats", summary="Statistics of every model")
async def all_stats(services: ServicesDep) -> ORJSONResponse:
    """Inference statistics of every loaded model version."""
    return ORJSONResponse(statistics(services.metrics, services.registry.hosted()))


@router.get("/models/{name}/stats", summary="Model statistics")
@router.get("/models/{name}/versions/{version}/stats", summary="Model statistics (version)")
async def model_stats(
    name: str, services: ServicesDep, version: str | None = None
) -> ORJSONResponse:
    """Inference statistics of a model's versions (or of one)."""
    hosted = model_version(services, name, version)
    models = [hosted] if version else list(services.registry.versions[name].values())
    return ORJSONResponse(statistics(services.metrics, models))


@router.get("/models/{name}/config", summary="Model configuration")
@router.get("/models/{name}/versions/{version}/config", summary="Model configuration (version)")
async def config(name: str, services: ServicesDep, version: str | None = None) -> ORJSONResponse:
    """The model's configuration in Triton's JSON model-config shape."""
    hosted = model_version(services, name, version)
    return ORJSONResponse(model_config(hosted, services.settings))
