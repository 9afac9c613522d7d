"""The OpenAPI document is a contract: schemathesis fuzzes every operation of the real server
from it (bounded), and no answer may be a server error, an undocumented status code, or a body
or content type other than the document says."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from serverproc import free_port, server_env

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


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "server exited during start-up"
        try:
            with urllib.request.urlopen(f"{url}/health/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready after {timeout}s")


def test_schemathesis_finds_nothing(model_repository: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = server_env(model_repository, models="tiny-se,tiny-gc", cpu_threads="2")
    log = (tmp_path / "server.log").open("wb")
    command = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(url, server)
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
        log.close()
    report = fuzz.stdout[-6000:]
    assert fuzz.returncode == 0, report
    tested = re.search(r"Tested: (\d+)", report)
    cases = re.search(r"(\d+) generated, (\d+) passed", report)
    assert tested and int(tested.group(1)) >= 16, report  # every route of the document
    assert cases and cases.group(1) == cases.group(2) and int(cases.group(1)) > 500, report
