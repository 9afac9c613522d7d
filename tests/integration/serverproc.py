"""Start the real server process for a test: a free loopback port and ATTNSERVE_* settings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(repository: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNSERVE_")}
    env["ATTNSERVE_MODEL_REPOSITORY"] = str(repository)
    env["ATTNSERVE_GRPC_PORT"] = "0"  # no gRPC port unless a test asks (servers run side by side)
    env.update({f"ATTNSERVE_{key.upper()}": value for key, value in settings.items()})
    return env


def start_server(
    repository: Path, log_path: Path, **settings: str
) -> tuple[str, subprocess.Popen[bytes]]:
    """`python -m service serve` on a free port with `settings`; its output goes to `log_path`."""
    port = free_port()
    command = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=server_env(repository, **settings), stdout=log, stderr=subprocess.STDOUT
        )
    return f"http://127.0.0.1:{port}", process


def wait_ready(
    url: str, process: subprocess.Popen[bytes], timeout: float = 120.0, log: Path | None = None
) -> None:
    """Poll /health/ready until 200; fails (with the end of `log`) if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
            raise AssertionError(f"server exited during start-up\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready after {timeout}s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Kill the server if it still runs."""
    if process.poll() is None:
        process.kill()
        process.wait(10)
