"""`ModelRunner`: one hosted model on the device, batch in, probabilities and attention out.

One host-to-device copy, optional autocast, attention capture and the summary map on the
device, one device-to-host copy, and a halving retry when CUDA runs out of memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from models import AttentionRecord, capture_attention, summary_map
from service.graph import TracedForward, trace_forward

__all__ = ["BatchOutput", "ModelRunner", "autocast_problem", "cpu_has_bf16"]

logger = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast_problem(device: torch.device, autocast: str) -> str | None:
    """Why `device` cannot run `autocast`, or None when it can.

    bf16 on the CPU needs native bf16 arithmetic (AVX512-BF16 or AMX tiles): elsewhere oneDNN
    emulates it, slower than float32."""
    if autocast == "fp16" and device.type != "cuda":
        return (
            f"autocast 'fp16' needs a CUDA device, got {device}. "
            "Hint: use autocast 'bf16' or 'none' on the CPU."
        )
    if autocast == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        return (
            "autocast 'bf16' on the CPU needs native bf16 support (avx512_bf16 or amx_bf16 "
            "in lscpu's flags), which this CPU lacks. Hint: use autocast 'none'."
        )
    if autocast == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"autocast 'bf16' is not supported on {device}. Hint: use 'fp16'."
    return None


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
        problem = autocast_problem(device, autocast)
        if problem is not None:
            raise ValueError(problem)
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

    def forward(self, batch: torch.Tensor, capture: bool) -> BatchOutput:
        """Classify a CPU batch (N, C, H, W); with `capture`, also return attention and summary."""
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

    def _forward_graph(self, graph: TracedForward, x: torch.Tensor, capture: bool) -> BatchOutput:
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
