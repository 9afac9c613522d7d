"""The server under test as a child process, plus CPU accounting read from /proc.

`ServerProcess` runs `sys.executable -m service serve` on a free 127.0.0.1 port with ATTNSERVE_*
settings, waits for /health/ready (bounded), and stops it with SIGTERM (then SIGKILL if it hangs).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "ServerError",
    "ServerProcess",
    "batch_stats",
    "free_port",
    "machine_busy_seconds",
    "parse_metrics",
    "process_cpu_seconds",
]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")


class ServerError(RuntimeError):
    """The server did not start, or died while being benchmarked."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (not idle or iowait) since boot, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _TICKS


class ServerProcess:
    """`python -m service serve` with the given settings, as a context manager."""

    def __init__(
        self,
        settings: dict[str, str],
        *,
        extra_env: dict[str, str] | None = None,
        ready_timeout_s: float = 300.0,
        host: str = "127.0.0.1",
        root: Path = REPO_ROOT,
    ) -> None:
        self.host = host
        self.port = free_port(host)
        self.settings = dict(settings)
        self.extra_env = dict(extra_env or {})
        self.ready_timeout_s = ready_timeout_s
        self.root = Path(root)
        self.startup_s = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        handle, name = tempfile.mkstemp(prefix="attnserve-bench-", suffix=".log")
        os.close(handle)
        self.log_path = Path(name)

    @property
    def pid(self) -> int:
        """The server's process id (ServerError when not running)."""
        if self._proc is None:
            raise ServerError("the server is not running")
        return self._proc.pid

    @property
    def base_url(self) -> str:
        """http://host:port of the server."""
        return f"http://{self.host}:{self.port}"

    def environment(self) -> dict[str, str]:
        """The child's environment: ours without other ATTNSERVE_* values, plus the settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNSERVE_")}
        env.update({f"ATTNSERVE_{k.upper()}": v for k, v in self.settings.items()})
        env.update(ATTNSERVE_HOST=self.host, ATTNSERVE_PORT=str(self.port))
        env.setdefault("ATTNSERVE_LOG_LEVEL", "warning")
        env.setdefault("ATTNSERVE_GRPC_PORT", "0")  # a gRPC port only when the bench asks
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        """Spawn the server and block until /health/ready answers 200 (bounded in time)."""
        started = time.monotonic()
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"],
                cwd=self.root,
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(started + self.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        logger.info("server pid %d ready in %.1fs", self.pid, self.startup_s)

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self.check_alive()
            if self._ready():
                return
            time.sleep(0.25)
        raise ServerError(f"not ready after {self.ready_timeout_s:.0f}s\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health/ready", timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def check_alive(self) -> None:
        """Raise ServerError with the end of its log if the server process has exited."""
        if self._proc is not None and self._proc.poll() is not None:
            raise ServerError(
                f"the server exited with status {self._proc.returncode}\n{self.log_tail()}"
            )

    def cpu_seconds(self) -> float:
        """CPU seconds used by the server process so far."""
        return process_cpu_seconds(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's combined stdout/stderr."""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 40.0) -> int | None:
        """SIGTERM, wait (the server drains), SIGKILL if it does not exit; its exit status."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "server pid %d ignored SIGTERM for %.0fs; killing", proc.pid, timeout_s
                )
                proc.kill()
                proc.wait(timeout=10)
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is None:
            self.log_path.unlink(missing_ok=True)
        else:
            logger.warning("server log kept at %s", self.log_path)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text exposition -> {(sample name, labels): value}; comments skipped."""
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def batch_stats(
    before: dict[tuple[str, frozenset[tuple[str, str]]], float],
    after: dict[tuple[str, frozenset[tuple[str, str]]], float],
    model: str,
) -> dict[str, Any]:
    """attnserve_batch_size between two scrapes: batches, mean size and per-bucket counts."""

    def delta(name: str, **labels: str) -> float:
        """Summed over the model's versions (the series carry a version label)."""
        wanted = {"model": model, **labels}.items()

        def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> float:
            return sum(
                v for (n, ls), v in samples.items() if n == name and wanted <= dict(ls).items()
            )

        return total(after) - total(before)

    count = delta("attnserve_batch_size_count")
    total = delta("attnserve_batch_size_sum")
    bounds = sorted(
        {dict(labels)["le"] for name, labels in after if name == "attnserve_batch_size_bucket"},
        key=float,
    )
    cumulative = [delta("attnserve_batch_size_bucket", le=le) for le in bounds]
    counts = [c - p for p, c in itertools.pairwise([0.0, *cumulative])]
    histogram = {_bucket_name(le): int(c) for le, c in zip(bounds, counts, strict=True) if c}
    return {
        "batches": int(count),
        "images": int(total),
        "mean": total / count if count else 0.0,
        "histogram": histogram,
    }


def _bucket_name(le: str) -> str:
    """'le=4.0' -> '<=4' for readable histogram keys."""
    return "+Inf" if le == "+Inf" else f"<={float(le):g}"
