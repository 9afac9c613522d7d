"""TorchScript traces (service.graph): same answers as eager for every shipped block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from models import capture_attention
from models.package import load_package
from service.graph import trace_forward
from service.runner import ModelRunner

CPU = torch.device("cpu")
ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"
BLOCKS = ["none", "se", "eca", "cbam", "gc", "coordatt", "sk", "stn"]


def _zoo_model(block: str) -> nn.Module:
    loaded = load_package(ZOO / f"digits-{block}")
    return loaded[0] if isinstance(loaded, tuple) else loaded


@pytest.mark.parametrize("block", BLOCKS)
def test_traced_runner_matches_eager(block: str) -> None:
    model = _zoo_model(block)
    eager = ModelRunner(block, model, device=CPU)
    traced = ModelRunner(block, model, device=CPU, trace=True)
    assert traced.traced and not eager.traced
    generator = torch.Generator().manual_seed(1)
    for size in (1, 5, 32):
        batch = torch.rand((size, 1, 64, 64), generator=generator)
        for capture in (True, False):
            want, got = eager.forward(batch, capture), traced.forward(batch, capture)
            torch.testing.assert_close(got.probs, want.probs, atol=1e-5, rtol=0)
            assert [(r.site, r.block, r.kind, r.derived) for r in got.records] == [
                (r.site, r.block, r.kind, r.derived) for r in want.records
            ]
            for g, w in zip(got.records, want.records, strict=True):
                assert g.tensor.shape == w.tensor.shape
                torch.testing.assert_close(g.tensor, w.tensor, atol=1e-4, rtol=0)
            if want.summary is None:
                assert got.summary is None
            else:
                torch.testing.assert_close(got.summary, want.summary, atol=1e-3, rtol=0)
    assert bool(traced.forward(batch, True).records) == (block != "none")


class _BatchDependent(nn.Module):
    """Takes a Python branch on the batch size: a trace at batch 2 would bake it in."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x.flatten(1))
        return logits if x.shape[0] <= 2 else -logits


def test_a_trace_that_disagrees_with_eager_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    model = _BatchDependent().eval()
    assert trace_forward(model, (1, 2, 2)) is None
    assert "running it eagerly" in caplog.text
    x = torch.rand(3, 1, 2, 2)
    with capture_attention(model) as cap:
        model(x)
    assert cap.records == []


def test_trace_is_off_for_autocast_and_when_disabled() -> None:
    model = _zoo_model("cbam")
    assert not ModelRunner("m", model, device=CPU, trace=False).traced
    assert not ModelRunner("m", model, device=CPU, autocast="bf16", trace=True).traced


def test_warmup_runs_both_graphs_of_a_traced_model() -> None:
    runner = ModelRunner("se", _zoo_model("se"), device=CPU, trace=True)
    graph = runner._graph
    assert graph is not None
    sizes: dict[str, list[int]] = {"plain": [], "capture": []}

    def counting(kind: str, inner: torch.jit.ScriptModule):
        def call(x: torch.Tensor):
            sizes[kind].append(int(x.shape[0]))
            return inner(x)

        return call

    graph.plain_graph = counting("plain", graph.plain_graph)  # type: ignore[assignment]
    graph.capture_graph = counting("capture", graph.capture_graph)  # type: ignore[assignment]
    runner.warmup([1, 4])
    assert sizes == {"plain": [1, 4], "capture": [1, 4]}
