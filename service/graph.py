"""Frozen TorchScript traces of a model's forward pass, with and without attention capture.

Why: an eager forward returns to Python between every op, so the device thread takes the GIL
back a few hundred times per batch. In the server the event loop and the CPU pool hold the GIL
much of the time, and every hand-over leaves the forward (and its idle OpenMP team) waiting. A
traced graph runs the whole forward in C++ without the GIL. `python -m bench.gil` measures it:
on the 2-core CPU box a batch of 32 through digits-cbam, while another thread kept the GIL
busy, took 634 ms eager and 145 ms traced (34 ms and 31 ms alone); see README "Benchmarks".

The capture graph is traced through `capture_attention`, so the hooks' tensors (and derived
views) become graph outputs; the records' names come from the same tracing run. `torch.jit.freeze`
folds batch norms into the convolutions, so results differ from eager by float rounding only;
`trace_forward` checks that on a second batch size and returns None (eager) when it does not.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from models import AttentionRecord, capture_attention

__all__ = ["TracedForward", "trace_forward"]

logger = logging.getLogger(__name__)

CHECK_ATOL = 1e-4  # probabilities and attention values: eager vs traced


class _Capturing(nn.Module):
    """The model under `capture_attention`: returns logits and every record's tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names: list[tuple[str, str, str, bool]] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        with capture_attention(self.model, derived=True) as cap:
            logits = self.model(x)
        self.names = [(r.site, r.block, r.kind, r.derived) for r in cap.records]
        return logits, tuple(r.tensor for r in cap.records)


@dataclass
class TracedForward:
    """`plain(x)` -> logits; `capture(x)` -> (logits, records), like the eager capture."""

    plain_graph: torch.jit.ScriptModule
    capture_graph: torch.jit.ScriptModule
    names: list[tuple[str, str, str, bool]]

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.plain_graph(x)
        return logits

    def capture(self, x: torch.Tensor) -> tuple[torch.Tensor, list[AttentionRecord]]:
        logits, tensors = self.capture_graph(x)
        records = [
            AttentionRecord(site, block, kind, tensor, derived)
            for (site, block, kind, derived), tensor in zip(self.names, tensors, strict=True)
        ]
        return logits, records


def _trace(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python ints: checked below
        traced = torch.jit.trace(module, example, check_trace=False)
        return torch.jit.freeze(traced.eval())


def trace_forward(model: nn.Module, input_size: tuple[int, ...]) -> TracedForward | None:
    """Trace `model` (eval mode, on its device) for inputs (N, *input_size), or None.

    None when tracing fails or the traces disagree with eager beyond CHECK_ATOL at a batch size
    other than the one traced with (a shape baked into the graph would show up there).
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    example = torch.rand((2, *input_size), generator=generator).to(device)
    check = torch.rand((3, *input_size), generator=generator).to(device)
    capturing = _Capturing(model)
    try:
        with torch.no_grad():
            traced = TracedForward(_trace(model, example), _trace(capturing, example), [])
            traced.names = list(capturing.names)
            _check(model, traced, check)
    except Exception as exc:  # any failure means: serve this model eagerly
        logger.warning("model not traced, running it eagerly: %s", exc)
        return None
    return traced


def _check(model: nn.Module, traced: TracedForward, x: torch.Tensor) -> None:
    """Raise ValueError unless the traces match eager on `x` (probabilities and records)."""
    with torch.inference_mode():
        with capture_attention(model, derived=True) as cap:
            eager = torch.softmax(model(x).float(), dim=1)
        plain = torch.softmax(traced.plain(x).float(), dim=1)
        logits, records = traced.capture(x)
        pairs = [(eager, plain), (eager, torch.softmax(logits.float(), dim=1))]
        if [(r.site, r.kind) for r in records] != [(r.site, r.kind) for r in cap.records]:
            raise ValueError("the traced capture records other sites than eager")
        pairs += [(e.tensor, t.tensor) for e, t in zip(cap.records, records, strict=True)]
    for expected, got in pairs:
        if expected.shape != got.shape or not torch.allclose(expected, got, atol=CHECK_ATOL):
            raise ValueError("the trace disagrees with eager at another batch size")
