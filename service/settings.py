"""Service settings: one pydantic-settings class read from ATTNSERVE_* environment variables.

Every field is typed and bounded so a bad value stops the service at start-up with a message
that names the setting, the offending value and the constraint (see `describe_errors`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["ENV_PREFIX", "MIB", "Settings", "default_model_repository", "describe_errors"]

ENV_PREFIX = "ATTNSERVE_"
MIB = 1024 * 1024


def default_model_repository() -> Path:
    """The `zoo` directory shipped inside the installed `models` package (not imported here)."""
    spec = importlib.util.find_spec("models")
    if spec is None or not spec.submodule_search_locations:
        return Path("models") / "zoo"
    return Path(next(iter(spec.submodule_search_locations))) / "zoo"


def _default_cpu_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _split_list(value: Any) -> Any:
    """Accept a JSON list or a comma-separated string (how lists arrive from the environment)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Configuration of one attnserve process; environment variables use the ATTNSERVE_ prefix."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, protected_namespaces=()
    )

    model_repository: Path = Field(
        default_factory=default_model_repository,
        description="Directory whose subdirectories holding a card.json are model packages.",
    )
    models: CommaList = Field(
        default_factory=list, description="Names of the packages to serve; empty serves all."
    )
    random_models: CommaList = Field(
        default_factory=list,
        description='Extra randomly initialised models, "arch:block" entries.',
    )
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    autocast: Literal["none", "fp16", "bf16"] = Field(
        default="none",
        description="Run forwards under autocast: fp16 on CUDA; bf16 on CUDA or on a CPU with "
        "native bf16 (avx512_bf16 or AMX), refused elsewhere. Autocast models run eagerly "
        "(not traced). bf16 speeds up ResNet-50-class models on such CPUs but slows small "
        "ones and moves a spatial transformer's answers, so it is off by default "
        "(docs/performance.md).",
    )
    channels_last: bool = False
    trace_models: bool = Field(
        default=True,
        description="On the CPU without autocast, run models as frozen TorchScript traces "
        "(the forward then needs no GIL); false runs them eagerly.",
    )
    instances: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Batches the device worker runs at once, each on its own thread; on the "
        "CPU each gets an equal share of torch's threads. 0: 2 on a CPU with 2 or more cores, "
        "1 on CUDA.",
    )
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_batch_delay_ms: float = Field(default=0.0, ge=0.0, le=10_000.0)
    max_queue_size: int = Field(default=256, ge=1, le=100_000)
    request_timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    max_body_bytes: int = Field(default=16 * MIB, ge=1024, le=1024 * MIB)
    max_image_pixels: int = Field(default=40_000_000, ge=1, le=1_000_000_000)
    max_images_per_request: int = Field(default=32, ge=1, le=1024)
    overlay_max_side: int = Field(
        default=512, ge=16, le=4096, description="Longest side of a map_format=overlay image."
    )
    block_routes: dict[str, str] = Field(
        default_factory=dict, description="JSON object block -> model name for /v1/predict."
    )
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int = Field(
        default=8001,
        ge=0,
        le=65535,
        description="Port of the KServe v2 / Triton gRPC service on `host`; 0 turns it off.",
    )
    model_control_mode: Literal["none", "explicit", "poll"] = Field(
        default="none",
        description="none: load every model at start; explicit: load what `models` names, "
        "then load and unload through /v2/repository; poll: rescan the repository every "
        "repository_poll_s seconds and apply what changed (as Triton's --model-control-mode).",
    )
    repository_poll_s: float = Field(
        default=15.0, ge=0.1, le=86_400.0, description="Seconds between rescans in poll mode."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    cpu_threads: int = Field(default_factory=_default_cpu_threads, ge=1, le=64)
    malloc_keep_freed: bool = Field(
        default=True,
        description="On the CPU with glibc, keep freed activation buffers mapped for the next "
        "batch instead of faulting them in again on every forward (service.tuning).",
    )
    inline_max_bytes: int = Field(
        default=64 * 1024,
        ge=0,
        le=16 * MIB,
        description="Decode and encode on the event loop itself when a request's only image "
        "(at most 256x256 pixels) or the answer's size bound is at most this many bytes; other "
        "work goes to the CPU pool. 0: always the pool (service.tuning).",
    )
    gc_freeze: bool = Field(
        default=True,
        description="After the models load, move the objects alive then out of the garbage "
        "collector's reach and collect the young generation less often (service.tuning).",
    )
    opentelemetry: bool = Field(
        default=False,
        description="FastAPI's own OpenTelemetry spans, metrics and logs, for an OpenTelemetry "
        "provider configured in the process; off by default, since without one every request "
        "still looks for a provider.",
    )

    max_response_bytes: int = Field(
        default=32 * MIB,
        ge=64 * 1024,
        le=4096 * MIB,
        description="Largest answer a request may ask for, estimated from its images, models, "
        "map levels and sizes before any work is done (413 past it; docs/api.md).",
    )
    max_map_cells: int = Field(
        default=4 * MIB,
        ge=1024,
        le=1024 * MIB,
        description="Work budget of one request: images x models x map cells (413 past it).",
    )
    drain_delay_s: float = Field(
        default=5.0,
        ge=0.0,
        le=300.0,
        description="After SIGTERM, seconds to keep serving while readiness reads 503, before "
        "the port closes and the drain starts.",
    )
    readiness: Literal["all", "any"] = Field(
        default="all",
        description="all: ready when every model is; any: when at least one is (per-model "
        "readiness tells the rest).",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="json: one JSON object a line, with an access log line per request.",
    )
    cors_origins: CommaList = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser (CORS); empty: none.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="File of API key digests (service.auth); unset: no authentication.",
    )
    auth_protect_metrics: bool = Field(
        default=False, description="With API keys, /metrics needs an inference key too."
    )
    auth_protect_docs: bool = Field(
        default=False,
        description="With API keys, /docs, /redoc and /openapi.json need an inference key too.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        le=600.0,
        description="Time a client has to send a request's line and headers, from the start "
        "of the connection or of the request (408 and closed past it).",
    )
    body_timeout_s: float = Field(
        default=15.0,
        gt=0.0,
        le=600.0,
        description="Longest pause while a request body arrives (408 and closed past it).",
    )
    keep_alive_timeout_s: float = Field(
        default=5.0,
        gt=0.0,
        le=3600.0,
        description="Idle time before a kept-alive connection closes.",
    )
    max_header_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        le=MIB,
        description="Largest request line plus headers (431 past it).",
    )
    max_header_count: int = Field(
        default=100, ge=8, le=10_000, description="Most headers in one request (431 past it)."
    )
    max_connections: int = Field(
        default=512,
        ge=2,
        le=100_000,
        description="Open connections (and requests in progress) past which requests are "
        "answered 503 (uvicorn's limit_concurrency).",
    )

    @field_validator("models", "random_models", "cors_origins", mode="before")
    @classmethod
    def _lists_from_strings(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("random_models")
    @classmethod
    def _arch_block_pairs(cls, value: list[str]) -> list[str]:
        for entry in value:
            arch, sep, block = entry.partition(":")
            if not sep or not arch or not block:
                raise ValueError(f'entry {entry!r} is not of the form "arch:block"')
        return value


def describe_errors(exc: ValidationError) -> str:
    """One line per invalid setting: its env variable, the bad value and what was expected."""
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        env = ENV_PREFIX + str(error["loc"][0]).upper() if error["loc"] else ENV_PREFIX + "*"
        value = error.get("input")
        lines.append(f"invalid setting {field} ({env}) = {value!r}: {error['msg']}")
    return "\n".join(lines)
