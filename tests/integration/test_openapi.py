"""The OpenAPI document is a contract: schemathesis fuzzes every operation of the real server
from it (bounded), and no answer may be a server error, an undocumented status code, or a body
or content type other than the document says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from serverproc import start_server, stop_server, wait_ready

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 50
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)


def test_schemathesis_finds_nothing(model_repository: Path, tmp_path: Path) -> None:
    url, server = start_server(
        model_repository, tmp_path / "server.log", models="tiny-se,tiny-gc", cpu_threads="2"
    )
    try:
        wait_ready(url, server)
        fuzz = subprocess.run(
            [
                *(sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json"),
                *("--checks", ",".join(CHECKS)),
                *("--max-examples", str(EXAMPLES_PER_OPERATION)),
                *("--phases", "examples,coverage,fuzzing"),
                *("--seed", "1", "--workers", "1", "--generation-database", "none"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert server.poll() is None, "the server died under the fuzzer"
    finally:
        server.terminate()
        server.wait(60)
        stop_server(server)
    report = fuzz.stdout[-6000:]
    assert fuzz.returncode == 0, report
    tested = re.search(r"Tested: (\d+)", report)
    cases = re.search(r"(\d+) generated, (\d+) passed", report)
    assert tested and int(tested.group(1)) >= 16, report  # every route of the document
    assert cases and cases.group(1) == cases.group(2) and int(cases.group(1)) > 500, report
