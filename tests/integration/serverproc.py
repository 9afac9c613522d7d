"""Start the real server process for a test: a free loopback port and ATTNSERVE_* settings."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(repository: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNSERVE_")}
    env["ATTNSERVE_MODEL_REPOSITORY"] = str(repository)
    env.update({f"ATTNSERVE_{key.upper()}": value for key, value in settings.items()})
    return env
