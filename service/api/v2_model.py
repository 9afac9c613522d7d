"""The Open Inference Protocol's model-level answers, protocol-neutral: shared by /v2 over HTTP
and the gRPC service, which differ only in how they put these on the wire.

Metadata, Triton's JSON model configuration, the statistics extension (read back from the
Prometheus series, `service.metrics`, never counted a second time), and the parsing of an
inference request's outputs and parameters.
"""

from __future__ import annotations

from typing import Any

from service.api.v2_codec import InputTensor, Requested
from service.api.v2_outputs import IMAGE, PROBABILITIES, SUMMARY, TENSOR, has_summary, site_outputs
from service.errors import BadRequest, NotReady
from service.hosting import HostedModel
from service.metrics import Metrics
from service.settings import Settings

__all__ = [
    "EXTENSIONS",
    "PLATFORM",
    "SERVER_NAME",
    "metadata",
    "model_config",
    "requested",
    "response_head",
    "single_input",
    "statistics",
]

SERVER_NAME = "attnserve"
EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "model_repository",
    "model_configuration",
    "statistics",
]
PLATFORM = "pytorch_attnserve"
BACKEND = "attnserve"
_TRITON_TYPES = {"FP32": "TYPE_FP32", "BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8"}


def _tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def _loaded(hosted: HostedModel) -> None:
    if hosted.config is None:
        raise NotReady(f"model {hosted.name!r} is {hosted.status}; metadata once it is loaded")


def _outputs(hosted: HostedModel) -> list[dict[str, Any]]:
    """The model's outputs, batch dimension first (-1: variable)."""
    outputs = [_tensor(PROBABILITIES, "FP32", [-1, len(hosted.data_config.labels)])]
    if has_summary(hosted):
        outputs.append(_tensor(SUMMARY, "FP32", [-1, -1, -1]))
    outputs += [_tensor(n, "FP32", [-1] * rank) for n, rank in site_outputs(hosted).items()]
    return outputs


def metadata(hosted: HostedModel, versions: list[int]) -> dict[str, Any]:
    """Model metadata: inputs and outputs, -1 for variable dimensions; `versions` hosted."""
    _loaded(hosted)
    config = hosted.data_config
    channels, height, width = config.input_size
    return {
        "name": hosted.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [
            _tensor(IMAGE, "BYTES", [-1]),
            _tensor(TENSOR, "FP32", [-1, channels, height, width]),
        ],
        "outputs": _outputs(hosted),
        "parameters": {
            "arch": hosted.source.arch,
            "attention": hosted.attention,
            "mean": ",".join(map(str, config.mean)),
            "std": ",".join(map(str, config.std)),
        },
    }


def _config_tensor(entry: dict[str, Any]) -> dict[str, Any]:
    """A metadata tensor as Triton's config lists it: its type, dims without the batch."""
    dims = entry["shape"][1:]
    tensor: dict[str, Any] = {
        "name": entry["name"],
        "data_type": _TRITON_TYPES[entry["datatype"]],
        "dims": dims or [1],
    }
    if not dims:
        tensor["reshape"] = {"shape": []}
    return tensor


def model_config(hosted: HostedModel, settings: Settings) -> dict[str, Any]:
    """The version's configuration in Triton's JSON model-config shape, with the values in
    effect (config.json over the settings)."""
    _loaded(hosted)
    meta = metadata(hosted, [hosted.version])
    batcher = hosted.batcher
    own = hosted.source.config
    timeout_s = own.timeout_s if own.timeout_s is not None else settings.request_timeout_s
    batch = batcher.max_batch_size if batcher else own.max_batch_size or settings.max_batch_size
    delay_s = batcher.max_batch_delay_s if batcher else settings.max_batch_delay_ms / 1000
    queue = batcher.max_queue_size if batcher else own.max_queue_size or settings.max_queue_size
    instances = batcher.max_concurrent_batches if batcher else own.instances or 1
    return {
        "name": hosted.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": own.policy_json(),
        "max_batch_size": batch,
        "input": [_config_tensor(t) for t in meta["inputs"]],
        "output": [_config_tensor(t) for t in meta["outputs"]],
        "dynamic_batching": {
            "max_queue_delay_microseconds": round(delay_s * 1e6),
            "default_queue_policy": {
                "max_queue_size": queue,
                "default_timeout_microseconds": round(timeout_s * 1e6),
            },
        },
        "instance_group": [
            {
                "name": hosted.name,
                "kind": "KIND_GPU" if settings.device.startswith("cuda") else "KIND_CPU",
                "count": instances,
            }
        ],
        "parameters": {
            **{k: {"string_value": v} for k, v in meta["parameters"].items()},
            "autocast": {"string_value": own.autocast or settings.autocast},
        },
    }


def statistics(metrics: Metrics, models: list[HostedModel]) -> dict[str, Any]:
    """The statistics extension's answer for `models` (Triton's shape), from the metrics."""
    return {"model_stats": [_model_stats(metrics, m.name, str(m.version)) for m in models]}


def _model_stats(metrics: Metrics, name: str, version: str) -> dict[str, Any]:
    def value(sample: str, **extra: str) -> float:
        return metrics.value(f"attnserve_{sample}", model=name, version=version, **extra)

    def duration(series: str, **extra: str) -> dict[str, int]:
        count, seconds = value(f"{series}_count", **extra), value(f"{series}_sum", **extra)
        return {"count": int(count), "ns": round(seconds * 1e9)}

    requests = "inference_request_duration_seconds"
    return {
        "name": name,
        "version": version,
        "last_inference": round(value("last_inference_timestamp_seconds") * 1000),
        "inference_count": int(value("batch_size_sum")),
        "execution_count": int(value("batch_size_count")),
        "inference_stats": {
            "success": duration(requests, outcome="success"),
            "fail": duration(requests, outcome="fail"),
            "queue": duration("queue_wait_seconds"),
            "compute_input": duration("compute_input_seconds"),
            "compute_infer": duration("inference_duration_seconds"),
            "compute_output": duration("compute_output_seconds"),
            "cache_hit": {"count": 0, "ns": 0},
            "cache_miss": {"count": 0, "ns": 0},
        },
        "batch_stats": [],
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


def response_head(header: dict[str, Any], model: str, version: int) -> dict[str, Any]:
    """The response's model name and version, with the request's "id" echoed."""
    head: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if "id" in header:
        if not isinstance(header["id"], str):
            raise BadRequest('the request "id" must be a string')
        head["id"] = header["id"]
    return head


def requested(header: dict[str, Any], hosted: HostedModel) -> list[Requested]:
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


def single_input(inputs: list[InputTensor]) -> InputTensor:
    if len(inputs) != 1 or inputs[0].name not in (IMAGE, TENSOR):
        names = [t.name for t in inputs]
        raise BadRequest(
            f"send exactly one input, {IMAGE!r} (BYTES, encoded images) or {TENSOR!r} "
            f"(FP32 or UINT8 [N, C, H, W]); got {names}"
        )
    return inputs[0]
