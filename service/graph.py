"""Frozen TorchScript traces of a model's forward pass, with and without attention capture.

Why: an eager forward returns to Python between every op, so in a busy server the device thread
waits for the GIL hundreds of times per batch behind the event loop and the CPU pool. A traced
graph runs the whole forward, the softmax and the summary map in C++ without the GIL
(docs/performance.md, `python -m bench.probes.gil`).

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

from models import AttentionRecord, capture_attention, summary_map

__all__ = ["TracedForward", "trace_forward"]

logger = logging.getLogger(__name__)

CHECK_ATOL = 1e-4  # probabilities and attention values: eager vs traced
SUMMARY_ATOL = 1e-3  # the summary map, min-max normalised per image, amplifies rounding


class _Plain(nn.Module):
    """The model's forward followed by the softmax: logits never leave the graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x).float(), dim=1)


class _Capturing(nn.Module):
    """The model under `capture_attention`: probabilities, every record's tensor and the
    summary map (the last output, when the model has a spatial view)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names: list[tuple[str, str, str, bool]] = []
        self.has_summary = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        with capture_attention(self.model, derived=True) as cap:
            probs = torch.softmax(self.model(x).float(), dim=1)
        self.names = [(r.site, r.block, r.kind, r.derived) for r in cap.records]
        summary = summary_map(cap.records, size=(int(x.shape[-2]), int(x.shape[-1])))
        self.has_summary = summary is not None
        tensors = [r.tensor.float() for r in cap.records]
        return probs, tuple(tensors if summary is None else [*tensors, summary])


@dataclass
class TracedForward:
    """`plain(x)` -> probabilities; `capture(x)` -> (probabilities, records, summary or None),
    what the eager forward, softmax, `capture_attention` and `summary_map` give."""

    plain_graph: torch.jit.ScriptModule
    capture_graph: torch.jit.ScriptModule
    names: list[tuple[str, str, str, bool]]
    has_summary: bool

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        probs: torch.Tensor = self.plain_graph(x)
        return probs

    def capture(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, list[AttentionRecord], torch.Tensor | None]:
        probs, tensors = self.capture_graph(x)
        summary = tensors[-1] if self.has_summary else None
        records = [
            AttentionRecord(site, block, kind, tensor, derived)
            for (site, block, kind, derived), tensor in zip(self.names, tensors, strict=False)
        ]
        return probs, records, summary


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
            plain, capture = _trace(_Plain(model), example), _trace(capturing, example)
            traced = TracedForward(plain, capture, capturing.names, capturing.has_summary)
            _check(model, traced, check)
    except Exception as exc:  # any failure means: serve this model eagerly
        logger.warning("model not traced, running it eagerly: %s", exc)
        return None
    return traced


def _check(model: nn.Module, traced: TracedForward, x: torch.Tensor) -> None:
    """Raise ValueError unless the traces match eager on `x` (probabilities, records, summary)."""
    size = (int(x.shape[-2]), int(x.shape[-1]))
    with torch.inference_mode():
        with capture_attention(model, derived=True) as cap:
            eager = torch.softmax(model(x).float(), dim=1)
        eager_summary = summary_map(cap.records, size=size)
        probs, records, summary = traced.capture(x)
        pairs = [(eager, traced.plain(x), CHECK_ATOL), (eager, probs, CHECK_ATOL)]
        if [(r.site, r.kind) for r in records] != [(r.site, r.kind) for r in cap.records]:
            raise ValueError("the traced capture records other sites than eager")
        for want, got in zip(cap.records, records, strict=True):
            pairs.append((want.tensor, got.tensor, CHECK_ATOL))
        if (eager_summary is None) != (summary is None):
            raise ValueError("the traced capture and eager disagree on having a summary map")
        if eager_summary is not None and summary is not None:
            pairs.append((eager_summary, summary, SUMMARY_ATOL))
    for expected, got, atol in pairs:
        if expected.shape != got.shape or not torch.allclose(expected, got, atol=atol):
            raise ValueError("the trace disagrees with eager at another batch size")
