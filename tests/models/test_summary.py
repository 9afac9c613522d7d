"""Summary map: one view per site, upsampling, GC scaling and per-image min-max normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import (
    CBAM,
    GC,
    SE,
    AttentionRecord,
    capture_attention,
    spatial_views,
    summary_map,
)


def record(site: str, kind: str, tensor: torch.Tensor, derived: bool = False) -> AttentionRecord:
    return AttentionRecord(site, "test", kind, tensor, derived)


def minmax(m: torch.Tensor) -> torch.Tensor:
    low, high = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
    return (m - low) / (high - low)


def test_none_without_spatial_views() -> None:
    assert summary_map([], (32, 32)) is None
    assert summary_map([record("a", "channel", torch.rand(2, 8))], (32, 32)) is None


def test_spatial_views_one_per_site_genuine_before_derived() -> None:
    derived = record("a", "spatial", torch.rand(1, 1, 4, 4), derived=True)
    genuine = record("a", "spatial", torch.rand(1, 1, 4, 4))
    context = record("b", "context", torch.rand(1, 1, 2, 2))
    second_call = record("b", "context", torch.rand(1, 1, 2, 2))
    channel = record("c", "channel", torch.rand(1, 8))
    views = spatial_views([derived, context, channel, genuine, second_call])
    assert views == [genuine, context]


def test_peak_lands_in_the_right_cell_after_upsampling() -> None:
    maps = torch.rand(2, 1, 6, 10) * 0.1
    maps[0, 0, 1, 7] = 1.0
    maps[1, 0, 4, 2] = 1.0
    out = summary_map([record("a", "spatial", maps)], (24, 40))
    assert out.shape == (2, 24, 40) and out.dtype == torch.float32
    for image, (row, col) in zip(out, [(1, 7), (4, 2)], strict=True):
        flat = int(image.argmax())
        assert (flat // 40 // 4, flat % 40 // 4) == (row, col)
        assert image.max() == 1.0


def test_range_and_constant_map() -> None:
    maps = torch.rand(3, 1, 5, 7)
    out = summary_map([record("a", "spatial", maps), record("b", "spatial", maps * 0.3)], (11, 9))
    assert out.shape == (3, 11, 9)
    assert out.min() == 0 and out.max() == 1
    for image in out:
        assert image.min() == 0 and image.max() == 1
    constant = summary_map([record("a", "spatial", torch.full((2, 1, 4, 4), 0.5))], (8, 8))
    assert torch.equal(constant, torch.zeros(2, 8, 8))


def test_gc_context_is_scaled_by_its_area() -> None:
    coarse = torch.tensor([[0.7, 0.1], [0.1, 0.1]]).reshape(1, 1, 2, 2)
    fine = torch.full((1, 1, 4, 4), 1 / 16)
    fine[0, 0, 3, 3] += 0.05
    fine /= fine.sum()
    out = summary_map([record("c3", "context", coarse), record("c4", "context", fine)], (8, 8))

    def up(m: torch.Tensor) -> torch.Tensor:
        return F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False)[:, 0]

    expected = minmax((up(coarse * 4) + up(fine * 16)) / 2)
    torch.testing.assert_close(out, expected)
    unscaled = minmax((up(coarse) + up(fine)) / 2)
    assert not torch.allclose(out, unscaled, atol=1e-3)


def test_real_models_give_maps_on_the_input_grid() -> None:
    for block in (CBAM(32), GC(32), SE(32)):
        model = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), block).eval()
        if isinstance(block, CBAM):
            block.spatial_bn.weight.data.fill_(1.0)  # past the official 0.5 init
        with torch.no_grad(), capture_attention(model, derived=True) as cap:
            model(torch.randn(2, 3, 30, 50))
        out = summary_map(cap.records, (30, 50))
        assert out.shape == (2, 30, 50)
        assert out.min() >= 0 and out.max() <= 1
        assert out.amax((1, 2)).eq(1).all()
