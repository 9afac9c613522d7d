"""The serving device and the worker threads that own it.

`resolve_device` turns the setting into a torch.device; `DeviceWorker` runs every forward pass on
its own threads so that torch never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from service.errors import NotReady

__all__ = ["DeviceWorker", "default_instances", "resolve_device"]

logger = logging.getLogger(__name__)

V = TypeVar("V")


def resolve_device(spec: str) -> torch.device:
    """Turn a settings value ("auto", "cpu", "cuda", "cuda:N") into a usable torch.device."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        try:
            device = torch.device(spec)
        except RuntimeError as exc:
            raise ValueError(f"invalid device {spec!r}: {exc}") from None
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {spec!r} asked for, but CUDA is not available to this torch build "
                f"({torch.__version__}). Hint: set ATTNSERVE_DEVICE=cpu or auto, or install a "
                "CUDA build of torch and check the driver with nvidia-smi."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {spec!r} does not exist: {torch.cuda.device_count()} CUDA device(s) "
                f"visible. Hint: use cuda:0..cuda:{torch.cuda.device_count() - 1}."
            )
        return device
    raise ValueError(f"unknown device {spec!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'")


def default_instances(device: torch.device, threads: int | None = None) -> int:
    """Device threads when the setting is 0: two on a CPU with at least two intra-op threads to
    share (`threads`, default torch's count), else one. Two single-threaded instances never
    wait for each other's OpenMP team (docs/performance.md); a CUDA device runs one stream."""
    if device.type == "cpu" and (threads or torch.get_num_threads()) >= 2:
        return 2
    return 1


class DeviceWorker:
    """Dedicated threads that run all device work, so the event loop never blocks.

    `instances`: how many device threads, each running one batch at a time (Triton's instance
    count). `threads`: intra-op threads of each (None: torch's count for the process, which
    follows OMP_NUM_THREADS, divided among the instances).
    """

    def __init__(
        self, device: torch.device, threads: int | None = None, instances: int = 1
    ) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        self.device = device
        self.instances = instances
        self.threads = threads or max(1, torch.get_num_threads() // instances)
        self._closed = False
        self._pool = ThreadPoolExecutor(
            max_workers=instances,
            thread_name_prefix=f"device-{device}",
            initializer=self._init_thread,
        )

    def _init_thread(self) -> None:
        """Give a device thread its intra-op threads and make its CUDA device the configured one."""
        torch.get_num_threads()  # the thread's lazy OpenMP set-up first, or it would undo this
        torch.set_num_threads(self.threads)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)

    async def run(self, fn: Callable[..., V], *args: Any, **kwargs: Any) -> V:
        """Run `fn(*args, **kwargs)` on a device thread and await its result."""
        if self._closed:
            raise NotReady(f"device worker for {self.device} is closed")
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def check(self) -> bool:
        """Touch the device with a tiny op on the device thread; False when it fails."""
        try:
            return await self.run(self._probe)
        except Exception:
            logger.exception("device check failed on %s", self.device)
            return False

    def _probe(self) -> bool:
        value = torch.ones(1, device=self.device) + 1
        return float(value.item()) == 2.0

    def memory_bytes(self) -> dict[str, int]:
        """CUDA memory allocated and reserved by torch on this device; {} on CPU."""
        if self.device.type != "cuda":
            return {}
        return {
            "allocated": int(torch.cuda.memory_allocated(self.device)),
            "reserved": int(torch.cuda.memory_reserved(self.device)),
        }

    def close(self) -> None:
        """Refuse new work, cancel what has not started and wait for the running call."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
