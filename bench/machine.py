"""The machine a benchmark ran on (hardware, software, threads) and how busy it was.

The box is shared, so `machine_state` lists the other processes using CPU at that moment and
`wait_until_quiet` can hold a run back until they are done (bounded in time).
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from bench.server import REPO_ROOT, machine_busy_seconds, process_cpu_seconds

__all__ = ["describe_machine", "machine_state", "wait_until_quiet"]

logger = logging.getLogger(__name__)

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_PACKAGES = ("torch", "numpy", "pillow", "fastapi", "starlette", "uvicorn", "uvloop", "orjson")


def _cpuinfo_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return 0.0


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def describe_machine(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, memory, Python/torch versions and thread settings (and the GPU if any)."""
    description: dict[str, Any] = {
        "cpu_model": _cpuinfo_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": _package_versions(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_parallel_info": torch.__config__.parallel_info().splitlines()[:6],
        "thread_env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
        },
        "cuda_available": torch.cuda.is_available(),
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return description


def _busy_processes(interval_s: float) -> tuple[float, list[dict[str, Any]]]:
    """Machine busy cores over `interval_s`, and the other processes using > 5% of a core."""

    def snapshot() -> dict[int, float]:
        usage = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    usage[int(entry.name)] = process_cpu_seconds(int(entry.name))
                except (OSError, ValueError, IndexError):
                    continue
        return usage

    first, busy0 = snapshot(), machine_busy_seconds()
    time.sleep(interval_s)
    second, busy1 = snapshot(), machine_busy_seconds()
    rows = []
    for pid, seconds in second.items():
        share = (seconds - first.get(pid, seconds)) / interval_s
        if share > 0.05:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                cmd = "?"
            rows.append({"pid": pid, "cpu_cores": round(share, 2), "cmdline": cmd.strip()[:160]})
    return (busy1 - busy0) / interval_s, sorted(rows, key=lambda r: -r["cpu_cores"])


def machine_state(interval_s: float = 1.0) -> dict[str, Any]:
    """Load averages, busy cores and the busiest other processes right now."""
    busy, processes = _busy_processes(interval_s)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "busy_cores": round(busy, 2),
        "other_processes": processes[:8],
    }


def wait_until_quiet(
    max_wait_s: float, threshold_cores: float = 0.3, poll_s: float = 30.0
) -> dict[str, Any]:
    """Poll until other processes use under `threshold_cores`, at most `max_wait_s` seconds."""
    deadline = time.monotonic() + max_wait_s
    waited = 0.0
    while True:
        state = machine_state(interval_s=2.0)
        if state["busy_cores"] < threshold_cores or time.monotonic() >= deadline:
            state["waited_s"] = round(waited, 1)
            state["quiet"] = state["busy_cores"] < threshold_cores
            return state
        logger.info("machine busy (%.2f cores); waiting", state["busy_cores"])
        pause = min(poll_s, max(0.0, deadline - time.monotonic()))
        time.sleep(pause)
        waited += pause + 2.0
