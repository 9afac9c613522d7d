"""The KServe v2 / Triton `inference.GRPCInferenceService` over the one pipeline.

A thin adapter like /v2 over HTTP: messages are the ones `tritonclient.grpc` ships
(`service_pb2`), requests become the same `InputTensor`s and `Requested` outputs
(`service.api.v2_codec`, `v2_model`) and run through the same pipeline and batchers, so a gRPC
and an HTTP request can share a batch. Outputs always travel as `raw_output_contents`.
Errors become gRPC status codes (`grpc_code`); a full queue adds a retry hint to the trailers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service.api.v2 import model_version
from service.api.v2_codec import InputTensor, OutputTensor, input_tensor, raw_bytes
from service.api.v2_model import (
    EXTENSIONS,
    SERVER_NAME,
    metadata,
    model_config,
    requested,
    response_head,
    single_input,
    statistics,
)
from service.api.v2_outputs import build_outputs, map_request, run_inputs
from service.auth import ADMIN, INFER, KeyRing, Verdict, presented_key
from service.errors import BadRequest, NotReady, QueueFull, ServiceError, UnknownModel
from service.state import Services

__all__ = ["InferenceServicer", "grpc_code"]

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
R = TypeVar("R")
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_MANAGEMENT = {"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}


def grpc_code(exc: ServiceError) -> grpc.StatusCode:
    """The gRPC status of a service error: a full queue is RESOURCE_EXHAUSTED (retry later),
    other 503s UNAVAILABLE; the rest follow the HTTP status."""
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return _CODES.get(exc.status_code, grpc.StatusCode.INTERNAL)


def _value(parameter: Any) -> Any:
    """An InferParameter (or ModelRepositoryParameter) as a Python value."""
    which = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, which) if which else None


def _header(request: pb.ModelInferRequest) -> dict[str, Any]:
    """The request's id, parameters and outputs in the shape of the HTTP JSON header."""
    header: dict[str, Any] = {
        "parameters": {k: _value(v) for k, v in request.parameters.items()},
        "outputs": [
            {"name": o.name, "parameters": {k: _value(v) for k, v in o.parameters.items()}}
            for o in request.outputs
        ],
    }
    if request.id:
        header["id"] = request.id
    return header


def _inputs(request: pb.ModelInferRequest) -> list[InputTensor]:
    """The request's inputs, from raw_input_contents (one per input) or typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input"
        )
    tensors = []
    for i, entry in enumerate(request.inputs):
        parameters = {k: _value(v) for k, v in entry.parameters.items()}
        shape = list(entry.shape)
        if raw:
            tensors.append(input_tensor(entry.name, entry.datatype, shape, parameters, raw=raw[i]))
            continue
        field = _CONTENTS.get(entry.datatype)
        elements = list(getattr(entry.contents, field)) if field else []
        tensors.append(
            input_tensor(entry.name, entry.datatype, shape, parameters, elements=elements)
        )
    return tensors


def _response(head: dict[str, Any], outputs: list[OutputTensor]) -> pb.ModelInferResponse:
    """The response message: every output's bytes in raw_output_contents."""
    response = pb.ModelInferResponse(
        model_name=head["model_name"], model_version=head["model_version"], id=head.get("id", "")
    )
    for out in outputs:
        tensor = response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        for key, value in out.parameters.items():
            tensor.parameters[key].string_param = str(value)
        response.raw_output_contents.append(raw_bytes(out))
    return response


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Every method of the service that attnserve offers; shared memory, tracing and logging
    settings answer UNIMPLEMENTED (the base class)."""

    def __init__(self, services: Services, version: str, keys: KeyRing | None = None) -> None:
        self.services = services
        self.version = version
        self.keys = keys

    async def _call(
        self, context: grpc.aio.ServicerContext, method: str, model: str, work: Awaitable[R]
    ) -> R:
        """Run one method's work: key check, error mapping, and the request metrics (whose
        status label is the HTTP status the same outcome has, so dashboards count both)."""
        started, status = time.perf_counter(), 200
        try:
            self._authorize(context, method)
            return await work
        except ServiceError as exc:
            status = exc.status_code
            code = grpc_code(exc)
            trailers: tuple[tuple[str, str], ...] = ()
            if isinstance(exc, QueueFull):
                retry, pushback = str(exc.retry_after), str(exc.retry_after * 1000)
                trailers = (("retry-after", retry), ("grpc-retry-pushback-ms", pushback))
            if exc.status_code >= 500:
                logger.info("gRPC %s -> %s %s", method, code.name, exc)
            await context.abort(code, str(exc.detail or exc.error), trailing_metadata=trailers)
            raise  # abort raises; this line only satisfies the type checker
        except asyncio.CancelledError:
            status = 499
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            status = 500
            logger.exception("unhandled error in gRPC %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error; see the log")
            raise
        finally:
            seconds = time.perf_counter() - started
            route = f"/{SERVICE}/{method}"
            self.services.metrics.observe_request(model, route, status, seconds)

    def _authorize(self, context: grpc.aio.ServicerContext, method: str) -> None:
        """API keys (when configured): the same decision as HTTP, from the call's metadata."""
        if self.keys is None:
            return
        needed = ADMIN if method in _MANAGEMENT else INFER
        key = presented_key((k, v) for k, v in context.invocation_metadata() or ())
        verdict = self.keys.check(key, needed)
        if verdict is Verdict.UNAUTHENTICATED:
            raise _AuthError(401, "an API key is needed: metadata authorization: Bearer <key>")
        if verdict is Verdict.FORBIDDEN:
            raise _AuthError(403, f"this API key may not call {method} (needs {needed})")

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> Any:
        return await self._call(context, "ServerLive", "", _done(pb.ServerLiveResponse(live=True)))

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> Any:
        async def work() -> pb.ServerReadyResponse:
            ready, _ = await self.services.readiness()
            return pb.ServerReadyResponse(ready=ready)

        return await self._call(context, "ServerReady", "", work())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> Any:
        async def work() -> pb.ModelReadyResponse:
            try:  # as Triton: an unknown or unloaded model is not ready, not an error
                hosted = model_version(self.services, request.name, request.version or None)
            except UnknownModel:
                return pb.ModelReadyResponse(ready=False)
            ready = hosted.status == "ready" and self.services.accepting
            return pb.ModelReadyResponse(ready=ready)

        return await self._call(context, "ModelReady", request.name, work())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> Any:
        response = pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self.version, extensions=EXTENSIONS
        )
        return await self._call(context, "ServerMetadata", "", _done(response))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> Any:
        async def work() -> pb.ModelMetadataResponse:
            hosted = model_version(self.services, request.name, request.version or None)
            meta = metadata(hosted, sorted(self.services.registry.versions[hosted.name]))
            meta.pop("parameters")  # the gRPC message has no parameters
            return json_format.ParseDict(meta, pb.ModelMetadataResponse())

        return await self._call(context, "ModelMetadata", request.name, work())

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> Any:
        async def work() -> pb.ModelConfigResponse:
            hosted = model_version(self.services, request.name, request.version or None)
            config = model_config(hosted, self.services.settings)
            return json_format.ParseDict({"config": config}, pb.ModelConfigResponse())

        return await self._call(context, "ModelConfig", request.name, work())

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> Any:
        async def work() -> pb.ModelStatisticsResponse:
            registry = self.services.registry
            if not request.name:
                models = registry.hosted()
            elif request.version:
                models = [model_version(self.services, request.name, request.version)]
            else:
                models = list(registry.versions.get(registry.get(request.name).name, {}).values())
            stats = statistics(self.services.metrics, models)
            return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

        return await self._call(context, "ModelStatistics", request.name, work())

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> Any:
        async def work() -> pb.RepositoryIndexResponse:
            index = await self._control().index(request.ready)
            return json_format.ParseDict({"models": index}, pb.RepositoryIndexResponse())

        return await self._call(context, "RepositoryIndex", "", work())

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> Any:
        async def work() -> pb.RepositoryModelLoadResponse:
            parameters = {k: _value(v) for k, v in request.parameters.items()}
            unknown = sorted(set(parameters) - {"config"})
            config = parameters.get("config")
            if unknown or (config is not None and not isinstance(config, str)):
                raise BadRequest(
                    f"load takes one parameter, config (a JSON string); got {sorted(parameters)}"
                )
            await self._control().load(request.model_name, config)
            return pb.RepositoryModelLoadResponse()

        return await self._call(context, "RepositoryModelLoad", request.model_name, work())

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> Any:
        async def work() -> pb.RepositoryModelUnloadResponse:
            await self._control().unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._call(context, "RepositoryModelUnload", request.model_name, work())

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> Any:
        return await self._call(context, "ModelInfer", request.model_name, self._infer(request))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request of the stream runs as it arrives (so they batch together); answers
        come as they finish, matched by id; an error answers its request, the stream goes on."""
        self._authorize(context, "ModelStreamInfer")
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def one(request: pb.ModelInferRequest) -> None:
            started, status = time.perf_counter(), 200
            try:
                answer = pb.ModelStreamInferResponse(infer_response=await self._infer(request))
            except ServiceError as exc:
                status = exc.status_code
                answer = pb.ModelStreamInferResponse(
                    error_message=str(exc.detail or exc.error),
                    infer_response=pb.ModelInferResponse(id=request.id),
                )
            seconds = time.perf_counter() - started
            route = f"/{SERVICE}/ModelStreamInfer"
            self.services.metrics.observe_request(request.model_name, route, status, seconds)
            await answers.put(answer)

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.ensure_future(one(request))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.wait(set(running))
            await answers.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        services = self.services
        hosted = model_version(services, request.model_name, request.model_version or None)
        with services.serving(hosted) as pipeline:
            header = _header(request)
            head = response_head(header, hosted.name, hosted.version)
            wanted = requested(header, hosted)
            tensor = single_input(_inputs(request))
            results = await run_inputs(pipeline, hosted, tensor, map_request(wanted))
            outputs = await pipeline.encode(build_outputs, hosted, wanted, results)
            return _response(head, outputs)

    def _control(self) -> Any:
        self.services.check_accepting()
        if self.services.control is None:
            raise NotReady("the service is starting")
        return self.services.control


class _AuthError(ServiceError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status
        self.error = "unauthenticated" if status == 401 else "forbidden"


async def _done(value: R) -> R:
    return value
