"""bf16 autocast and channels_last on the CPU: the shipped models keep their answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from models.package import load_package
from models.training.data import heldout_canvases
from service.app import _device
from service.imaging import preprocess
from service.repository import ConfigError
from service.runner import ModelRunner, autocast_problem, cpu_has_bf16
from service.settings import Settings

CPU = torch.device("cpu")
ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"
needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16")


def _zoo_model(block: str) -> nn.Module:
    loaded = load_package(ZOO / f"digits-{block}")
    return loaded[0] if isinstance(loaded, tuple) else loaded


@pytest.fixture(scope="module")
def canvases() -> torch.Tensor:
    """The first held-out canvases (real digits in clutter, never trained on), preprocessed as
    the shipped models' (shared) data config says."""
    config = _zoo_model("none").data_config
    images = heldout_canvases().subset(32).images
    return torch.stack([preprocess(Image.fromarray(image), config).tensor for image in images])


@needs_bf16
@pytest.mark.parametrize("block", ["cbam", "se"])
def test_bf16_autocast_keeps_top1_and_maps_on_real_digits(
    block: str, canvases: torch.Tensor
) -> None:
    fp32 = ModelRunner(block, _zoo_model(block), device=CPU)
    bf16 = ModelRunner(block, _zoo_model(block), device=CPU, autocast="bf16", trace=True)
    assert not bf16.traced  # bf16 runs eagerly under autocast
    want, got = fp32.forward(canvases, capture=True), bf16.forward(canvases, capture=True)
    assert (got.probs - want.probs).abs().max() < 0.05
    # The top class is kept wherever it is clear; a near tie (digits-cbam has one at 0.452
    # against 0.449 among these canvases) may go either way at bf16's precision.
    top2 = want.probs.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 0.05
    assert int(clear.sum()) >= len(canvases) - 2
    assert torch.equal(got.probs.argmax(1)[clear], want.probs.argmax(1)[clear])
    assert got.probs.dtype == torch.float32
    assert all(r.tensor.dtype == torch.float32 for r in got.records)
    assert want.summary is not None and got.summary is not None
    assert (got.summary - want.summary).abs().mean() < 0.02
    for a, b in zip(want.records, got.records, strict=True):
        assert (a.site, a.kind) == (b.site, b.kind)
        assert (a.tensor - b.tensor).abs().max() < 0.15, a.site


def test_traced_channels_last_equals_eager() -> None:
    model = _zoo_model("cbam")
    eager = ModelRunner("e", model, device=CPU)
    traced_cl = ModelRunner("t", _zoo_model("cbam"), device=CPU, channels_last=True, trace=True)
    assert traced_cl.traced
    x = torch.rand((5, 1, 64, 64), generator=torch.Generator().manual_seed(3))
    want, got = eager.forward(x, capture=True), traced_cl.forward(x, capture=True)
    torch.testing.assert_close(got.probs, want.probs, atol=1e-4, rtol=0)
    for a, b in zip(want.records, got.records, strict=True):
        torch.testing.assert_close(b.tensor, a.tensor, atol=1e-4, rtol=0)
    assert want.summary is not None and got.summary is not None
    torch.testing.assert_close(got.summary, want.summary, atol=1e-3, rtol=0)


def test_bf16_on_a_cpu_without_native_bf16_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not cpu_has_bf16()
    problem = autocast_problem(CPU, "bf16")
    assert problem is not None and "avx512_bf16" in problem
    with pytest.raises(ValueError, match="native bf16"):
        ModelRunner("d", _zoo_model("se"), device=CPU, autocast="bf16")
    assert autocast_problem(CPU, "none") is None
    assert "CUDA" in (autocast_problem(CPU, "fp16") or "")
    for autocast in ("bf16", "fp16"):  # the server refuses to start, before loading any model
        with pytest.raises(ConfigError, match=autocast):
            _device(Settings(models=[], device="cpu", autocast=autocast))
