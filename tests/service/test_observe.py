"""Request observation: one span per stage with the request ID (OpenTelemetry SDK, in-memory
exporter), the access log record, the JSON log format, and CORS only when configured."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest
from inprocess import serve
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.observe import JsonFormatter
from service.settings import Settings

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracer_provider() -> None:
    """The process's tracer provider (settable once), exporting into EXPORTER."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)


async def test_spans_per_stage_carry_the_request_id(
    model_repository: Path, digits: list, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(model_repository=model_repository, models=["tiny-se"], opentelemetry=True)
    async with serve(settings) as served:
        EXPORTER.clear()
        with caplog.at_level(logging.INFO, logger="attnserve.access"):
            answer = await served.client.post(
                "/v1/models/tiny-se/predict",
                content=digits[0][1],
                headers={"content-type": "image/png", "x-request-id": "span-1"},
            )
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "span-1"
    spans = [s for s in EXPORTER.get_finished_spans() if s.name != "GET /health/ready"]
    ours = [s for s in spans if (s.attributes or {}).get("attnserve.request_id") == "span-1"]
    by_name = {s.name: s for s in ours}
    root = by_name["POST /v1/models/{name}/predict"]
    assert root.attributes["attnserve.model"] == "tiny-se"
    assert root.attributes["http.response.status_code"] == 200
    stages = ["decode", "queue", "forward", "encode"]
    assert set(stages) <= set(by_name)
    for name in stages:
        span = by_name[name]
        assert span.parent is not None and span.parent.span_id == root.context.span_id
        assert root.start_time <= span.start_time <= span.end_time <= root.end_time
    ordered = [by_name[name] for name in stages]
    for before, after in itertools.pairwise(ordered):
        assert before.end_time <= after.start_time, (before.name, after.name)
    [record] = [r for r in caplog.records if getattr(r, "request_id", None) == "span-1"]
    assert record.route == "/v1/models/{name}/predict" and record.status == 200
    assert record.batch_size == 1 and record.bytes == len(answer.content)


def test_json_formatter_writes_one_object_with_the_extras() -> None:
    record = logging.LogRecord("attnserve.access", logging.INFO, __file__, 1, "GET %s", ("/x",),
                               None)  # fmt: skip
    record.request_id, record.status = "r-1", 200
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["message"] == "GET /x" and entry["level"] == "info"
    assert entry["request_id"] == "r-1" and entry["status"] == 200
    assert entry["logger"] == "attnserve.access" and entry["time"].endswith("Z")


async def test_cors_only_for_configured_origins(model_repository: Path) -> None:
    preflight = {
        "origin": "https://viewer.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
    }
    url = "/v1/models/tiny-se/predict"
    closed = Settings(model_repository=model_repository, models=["tiny-se"])
    async with serve(closed) as served:
        answer = await served.client.options(url, headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
    opened = Settings(
        model_repository=model_repository, models=["tiny-se"], cors_origins="https://viewer.example"
    )
    async with serve(opened) as served:
        allowed = await served.client.options(url, headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://viewer.example"
        other = await served.client.options(url, headers={**preflight, "origin": "https://x.test"})
        assert other.headers.get("access-control-allow-origin") != "https://x.test"
