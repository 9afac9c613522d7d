"""The device worker: its instance threads own the accelerator and run every forward pass.

`DeviceWorker` keeps torch off the event loop; `ModelRunner` does "batch in, results out" for one
hosted model: one host-to-device copy, optional autocast, attention capture and summary map on the
device, one device-to-host copy, and a halving retry when CUDA runs out of memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from models import AttentionRecord, capture_attention, summary_map
from service.errors import NotReady
from service.graph import Batch, TracedForward, trace_forward

__all__ = ["BatchOutput", "DeviceWorker", "ModelRunner", "default_instances", "resolve_device"]

logger = logging.getLogger(__name__)

V = TypeVar("V")

_AUTOCAST_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    """Device threads when the setting is 0: two on a CPU with at least two intra-op threads
    to share (`threads`, default torch's count), else one.

    On the 2-core CPU box two single-threaded instances served 20-44 % more requests per
    second at concurrency 64 than one instance with two intra-op threads (596 vs 496 and 689 vs
    478 req/s in two runs of the variants group of `make bench`; README "Benchmarks").
    A CUDA device runs one stream of kernels at a time, so it keeps one instance.
    """
    if device.type == "cpu" and (threads or torch.get_num_threads()) >= 2:
        return 2
    return 1


# glibc mallopt parameters (malloc.h) and the values keep_freed_memory sets.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_PR_SET_NAME = 15  # prctl option: set the calling thread's name
_MALLOC_SETTINGS = ((_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, 256 * 2**20),
                    (_M_TOP_PAD, 64 * 2**20))  # fmt: skip


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed activation buffers for the next batch (False if not glibc).

    By default each multi-megabyte activation tensor is mmap'ed and unmapped again (or trimmed
    from the heap), so every forward pass faults its pages in anew: 20,000-50,000 page faults
    per second per device thread in the server at concurrency 64. Serving from the heap up to
    32 MiB per block and trimming only above 256 MiB free stops that; the device threads then
    spent about 9 % less CPU per request (bench, digits-cbam, 2-core box). Process-wide; the
    in-process benchmark limit calls it too.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in _MALLOC_SETTINGS)


def settle_gc(threshold: int, *, freeze: bool = True) -> None:
    """Keep Python's cyclic garbage collector off the request path, once the models are loaded.

    After start-up the process tracks about 200,000 container objects (torch, the models, the
    web stack) that live until exit. A full collection walks all of them while holding the GIL
    (93 ms on the 2-core box, `python -m bench.gil`), and no request moves and no forward pass
    can start or hand back its batch meanwhile; at concurrency 64 that happened 4-5 times per
    10 s (`python -m bench.threads`, with this off; README "Benchmarks"). With `freeze` the
    garbage present now is collected once and every surviving object goes to the permanent
    generation, so later collections walk only what requests created. `threshold` is the
    number of net allocations that starts a young-generation collection (Python's default 700
    ran one every few requests); the older generations keep their thresholds. Process-wide;
    the in-process benchmark limit calls it too.
    """
    if freeze:
        gc.collect()
        gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)


def name_os_thread() -> None:
    """Give the calling OS thread its Python thread's name (15 bytes at most), so that `top -H`,
    py-spy and `python -m bench.threads` tell device, CPU pool and event loop threads apart."""
    prctl = _libc_function("prctl")
    if prctl is not None:
        prctl(_PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)


@functools.cache
def _libc_function(name: str) -> Any:
    """A C library function, or None where there is no such function (not glibc/Linux)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def use_one_thread() -> None:
    """Make torch ops on the calling thread single-threaded (the CPU pool's initializer).

    With the OpenMP backend every thread that runs a parallel torch op starts its own team of
    intra-op threads. A second team on a small machine oversubscribes the cores: libgomp then
    lets idle team threads sleep at once instead of spinning, and every parallel region of the
    forward pass pays a wake-up (measured: a batch-1 forward took about twice as long in the
    server as in one thread, see README "Benchmarks"). Only device threads get a team.
    """
    torch.get_num_threads()  # the thread's lazy OpenMP set-up runs first, or it would undo this
    torch.set_num_threads(1)
    name_os_thread()


def use_batch_scheduling() -> bool:
    """Put the calling thread under Linux's SCHED_BATCH policy (the CPU pool's threads, see
    `Settings.cpu_pool_sched_batch`); False where that is not available.

    A pool thread is woken for every job the event loop hands it. Under the normal policy the
    kernel often lets the woken thread preempt the one running on that core, a device thread
    in the middle of a forward or the event loop. A SCHED_BATCH thread does not preempt on
    wake-up: it waits for a tick or a free core and then runs the jobs queued meanwhile back
    to back. At c=64 that cut the context switches of the device and pool threads to under a
    third, those of the event loop to under half, and the pool's CPU per request by about a
    quarter (README "Benchmarks"). Same nice value, same share of the CPU; no privilege needed
    (only the real-time policies need one).
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as exc:  # e.g. a seccomp profile that refuses the call
        logger.warning("CPU pool thread stays on the default scheduling policy: %s", exc)
        return False
    return True


class DeviceWorker:
    """Dedicated threads that run all device work, so the event loop never blocks.

    `instances`: how many device threads, each running one batch at a time (Triton's instance
    count). `threads`: intra-op threads of each (None: the count torch chose for the process,
    which follows OMP_NUM_THREADS, divided among the instances).

    Why more than one on a CPU: with one thread whose OpenMP team spans every core, each of the
    forward's parallel regions waits for its slowest team thread, and in a server the event
    loop and the CPU pool keep preempting one of them. Two single-threaded instances on two
    cores never wait for each other; see README "Benchmarks" for the measurement.
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
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=instances,
            thread_name_prefix=f"device-{device}",
            initializer=self._init_thread,
        )

    def _init_thread(self) -> None:
        """Give a device thread its intra-op threads and make its CUDA device the configured one."""
        torch.get_num_threads()  # lazy per-thread OpenMP set-up first (see use_one_thread)
        torch.set_num_threads(self.threads)
        name_os_thread()
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)

    @property
    def pending(self) -> int:
        """Calls submitted but not started yet; a batcher's chain of batches yields to them."""
        return self._pending

    async def run(self, fn: Callable[..., V], *args: Any, **kwargs: Any) -> V:
        """Run `fn(*args, **kwargs)` on a device thread and await its result."""
        if self._closed:
            raise NotReady(f"device worker for {self.device} is closed")
        loop = asyncio.get_running_loop()
        with self._pending_lock:
            self._pending += 1
        started = False

        def call() -> V:
            mark_taken()
            return fn(*args, **kwargs)

        def mark_taken() -> None:  # once per call: when a thread takes it or it is dropped
            nonlocal started
            with self._pending_lock:
                if not started:
                    started = True
                    self._pending -= 1

        try:
            return await loop.run_in_executor(self._pool, call)
        finally:
            mark_taken()  # a call cancelled before any thread took it never runs

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


@dataclass
class BatchOutput:
    """Results of one forward pass, all on the CPU.

    probs: (N, K) float32 softmax; records: captured attention (float32 tensors, batch first);
    summary: (N, H, W) map on the input grid, or None (no capture, or no spatial view).
    """

    probs: torch.Tensor
    records: list[AttentionRecord]
    summary: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.probs.shape[0])


class ModelRunner:
    """One hosted model on the device: batch in, probabilities and attention out.

    `trace`: on the CPU without autocast, run the forward as frozen TorchScript traces (see
    service.graph: no GIL during the forward); `self.traced` says whether that is in use.
    """

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        *,
        device: torch.device,
        autocast: str = "none",
        channels_last: bool = False,
        trace: bool = False,
    ) -> None:
        if autocast not in _AUTOCAST_DTYPES:
            raise ValueError(
                f"autocast must be one of {sorted(_AUTOCAST_DTYPES)}, got {autocast!r}"
            )
        if autocast == "fp16" and device.type != "cuda":
            raise ValueError(
                f"autocast 'fp16' needs a CUDA device, got {device}. "
                "Hint: use autocast 'bf16' or 'none' on the CPU."
            )
        self.name = name
        self.device = device
        self.autocast = autocast
        self.channels_last = channels_last
        self._dtype = _AUTOCAST_DTYPES[autocast]
        model = model.to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = model
        data_config = getattr(model, "data_config", None)
        self.input_size: tuple[int, ...] | None = (
            None if data_config is None else tuple(data_config.input_size)
        )
        self._eager_lock = threading.Lock()
        self._graph: TracedForward | None = None
        if trace and device.type == "cpu" and self._dtype is None and self.input_size:
            self._graph = trace_forward(model, self.input_size)

    @property
    def traced(self) -> bool:
        return self._graph is not None

    def forward(self, batch: Batch, capture: bool) -> BatchOutput:
        """Classify a CPU batch (N, C, H, W), or a list of (C, H, W) images; with `capture`, also
        return attention and summary. A traced model stacks the list inside its graph (no GIL
        hand-over for the stack, see service.graph)."""
        if isinstance(batch, list):
            if any(image.ndim != 3 for image in batch):
                shapes = [tuple(image.shape) for image in batch]
                raise ValueError(f"expected (C, H, W) images, got shapes {shapes}")
            if self._graph is None or self.channels_last:
                batch = torch.stack(batch)
            else:
                with torch.inference_mode():
                    return self._forward_graph(self._graph, batch, capture)
        if batch.ndim != 4:
            raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(batch.shape)}")
        with torch.inference_mode():
            return self._forward_split(batch, capture)

    def warmup(self, batch_sizes: Iterable[int]) -> None:
        """Run a capture forward at every size so kernels and allocator are ready before traffic.

        A traced model has a second graph for `maps=none` requests, warmed up too: TorchScript
        profiles each graph on its first calls, which are slower."""
        if self.input_size is None:
            raise ValueError(f"model {self.name!r} has no data_config to warm up with")
        c, h, w = self.input_size
        generator = torch.Generator().manual_seed(0)
        for size in batch_sizes:
            batch = torch.rand((size, c, h, w), generator=generator)
            self.forward(batch, capture=True)
            if self.traced:
                self.forward(batch, capture=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _forward_split(self, batch: torch.Tensor, capture: bool) -> BatchOutput:
        """Forward the batch; on CUDA out-of-memory, free the cache and run each half in turn."""
        try:
            return self._forward_once(batch, capture)
        except torch.cuda.OutOfMemoryError:
            if batch.shape[0] <= 1:
                raise
        # Retrying outside the except block lets the traceback, and the tensors it holds, go.
        self._free_memory()
        half = (batch.shape[0] + 1) // 2
        logger.warning(
            "model %s: out of memory at batch %d, splitting into %d + %d",
            self.name,
            batch.shape[0],
            half,
            batch.shape[0] - half,
        )
        parts = [
            self._forward_split(batch[:half], capture),
            self._forward_split(batch[half:], capture),
        ]
        return _concat(parts)

    def _forward_graph(self, graph: TracedForward, x: Batch, capture: bool) -> BatchOutput:
        """Through the traced graphs, which include the softmax and the summary map."""
        if capture:
            return BatchOutput(*graph.capture(x))
        return BatchOutput(graph.plain(x), [], None)

    def _forward_once(self, batch: torch.Tensor, capture: bool) -> BatchOutput:
        x = self._to_device(batch)
        if self._graph is not None:
            return self._forward_graph(self._graph, x, capture)
        records: list[AttentionRecord] = []
        summary = None
        # Capture hooks go on the shared module, and any forward of it would feed them: with
        # several instances, eager forwards of one model take turns (traced ones do not).
        with self._eager_lock:
            if capture:
                with capture_attention(self.model, derived=True) as cap, self._autocast():
                    logits = self.model(x)
                records = list(cap.records)
            else:
                with self._autocast():
                    logits = self.model(x)
        if records:
            summary = summary_map(records, size=(int(x.shape[-2]), int(x.shape[-1])))
        probs = torch.softmax(logits.float(), dim=1)
        return _to_cpu(BatchOutput(probs, records, summary))

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """One host-to-device copy: pinned memory and non_blocking on CUDA."""
        if self.device.type == "cpu" and batch.device.type == "cpu" and not self.channels_last:
            return batch  # no op call at all: each one would give the GIL back and wait for it
        if self.device.type == "cuda" and batch.device.type == "cpu":
            if not batch.is_pinned():
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._dtype)

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _tensors(out: BatchOutput) -> Iterator[torch.Tensor]:
    yield out.probs
    for record in out.records:
        yield record.tensor
    if out.summary is not None:
        yield out.summary


def host_copy(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy tensors to the CPU as float32 in one transfer: flatten, concatenate, copy, split."""
    flat = torch.cat([t.float().reshape(-1) for t in tensors]).cpu()
    chunks = flat.split([t.numel() for t in tensors])
    return [chunk.view(t.shape) for chunk, t in zip(chunks, tensors, strict=True)]


def _to_cpu(out: BatchOutput) -> BatchOutput:
    """Move every tensor of `out` to the CPU as float32, in one copy when it is on a device."""
    tensors = [t.float() for t in _tensors(out)]
    moved = tensors if tensors[0].device.type == "cpu" else host_copy(tensors)
    probs, *rest = moved
    summary = rest.pop() if out.summary is not None else None
    records = [dataclasses.replace(r, tensor=t) for r, t in zip(out.records, rest, strict=True)]
    return BatchOutput(probs, records, summary)


def _concat(parts: list[BatchOutput]) -> BatchOutput:
    """Join the outputs of consecutive sub-batches (same model, so same records in order)."""
    first = parts[0]
    records = [
        dataclasses.replace(rec, tensor=torch.cat([p.records[i].tensor for p in parts]))
        for i, rec in enumerate(first.records)
    ]
    summaries = [p.summary for p in parts if p.summary is not None]
    summary = torch.cat(summaries) if first.summary is not None else None
    return BatchOutput(torch.cat([p.probs for p in parts]), records, summary)
