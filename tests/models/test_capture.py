"""Attention capture: records, kinds and shapes per block, no effect on outputs, no hooks left."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.attention import (
    CBAM,
    ECA,
    GC,
    SE,
    AttentionRecord,
    CoordAtt,
    SiteInfo,
    SKConv,
    capture_attention,
    list_sites,
)

N, C, H, W = 2, 64, 13, 21


class Net(nn.Module):
    """Every block once, at module paths like a ResNet's (``layer1.0`` ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.layer1 = nn.Sequential(SE(C), ECA(C), CBAM(C))
        self.layer2 = nn.Sequential(GC(C), CoordAtt(C))
        self.conv2 = SKConv(C, C)
        self.head = nn.Linear(C, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.layer2(self.layer1(self.stem(x))))
        return self.head(x.mean((2, 3)))


EXPECTED = [
    ("layer1.0", "se", "channel", (N, C)),
    ("layer1.1", "eca", "channel", (N, C)),
    ("layer1.2", "cbam", "channel", (N, C)),
    ("layer1.2", "cbam", "spatial", (N, 1, H, W)),
    ("layer2.0", "gc", "context", (N, 1, H, W)),
    ("layer2.0", "gc", "channel", (N, C)),
    ("layer2.1", "coordatt", "coord_h", (N, C, H, 1)),
    ("layer2.1", "coordatt", "coord_w", (N, C, 1, W)),
    ("conv2", "sk", "branch", (N, 2, C)),
]
DERIVED_SITES = ["layer1.0", "layer1.1", "layer2.1", "conv2"]


@pytest.fixture(scope="module")
def net() -> Net:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # non-trivial GC transform and CBAM spatial gate
        model.layer2[0].channel_add_conv[3].weight.normal_(0, 0.1)
        model.layer1[2].spatial_bn.weight.fill_(1.0)
    return model


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def summary(records: list[AttentionRecord]) -> list[tuple]:
    return [(r.site, r.block, r.kind, tuple(r.tensor.shape)) for r in records if not r.derived]


def test_records_kinds_and_shapes_in_forward_order(net: Net) -> None:
    x = torch.randn(N, 3, H, W)
    with torch.no_grad(), capture_attention(net) as cap:
        net(x)
    assert summary(cap.records) == EXPECTED
    for record in cap.records:
        assert record.tensor.dtype == torch.float32
        assert not record.tensor.requires_grad
        assert not record.derived


def test_derived_views_are_spatial_and_in_unit_interval(net: Net) -> None:
    with torch.no_grad(), capture_attention(net, derived=True) as cap:
        net(torch.randn(N, 3, H, W))
    assert summary(cap.records) == EXPECTED
    derived = [r for r in cap.records if r.derived]
    assert [r.site for r in derived] == DERIVED_SITES
    for record in derived:
        assert record.kind == "spatial"
        assert record.tensor.shape == (N, 1, H, W)
        assert record.tensor.dtype == torch.float32
        assert record.tensor.min() >= 0 and record.tensor.max() <= 1


def test_capture_does_not_change_outputs_and_leaves_no_hooks(net: Net) -> None:
    x = torch.randn(N, 3, H, W)
    before = all_hooks(net)
    with torch.no_grad():
        plain = net(x)
        with capture_attention(net, derived=True) as cap:
            assert all_hooks(net) > before
            captured = net(x)
        after = net(x)
    assert cap.records
    assert torch.equal(plain, captured) and torch.equal(plain, after)
    assert all_hooks(net) == before == 0


def test_hooks_removed_after_an_exception(net: Net) -> None:
    with pytest.raises(RuntimeError, match="boom"), capture_attention(net, derived=True):
        assert all_hooks(net) > 0
        raise RuntimeError("boom")
    assert all_hooks(net) == 0


def test_records_are_detached_copies_in_training_mode() -> None:
    model = Net().train()
    x = torch.randn(N, 3, H, W, requires_grad=True)
    with capture_attention(model, derived=True) as cap:
        model(x).sum().backward()
    assert all(not r.tensor.requires_grad for r in cap.records)
    assert len(cap.records) == len(EXPECTED) + len(DERIVED_SITES)


def test_list_sites_needs_no_forward_pass() -> None:
    container = nn.ModuleDict({"a": SE(C), "b": nn.ModuleList([CBAM(C), SKConv(C, C)])})
    assert list_sites(container) == [
        SiteInfo("a", "se", ("channel",)),
        SiteInfo("b.0", "cbam", ("channel", "spatial")),
        SiteInfo("b.1", "sk", ("branch",)),
    ]
    assert [s.kinds for s in list_sites(container, derived=True)] == [
        ("channel", "spatial"),
        ("channel", "spatial"),
        ("branch", "spatial"),
    ]


def test_list_sites_matches_captured_records(net: Net) -> None:
    with torch.no_grad(), capture_attention(net, derived=True) as cap:
        net(torch.randn(1, 3, H, W))
    for site in list_sites(net, derived=True):
        assert tuple(r.kind for r in cap.records if r.site == site.site) == site.kinds
    assert list_sites(nn.Sequential(nn.Conv2d(3, 3, 1))) == []


def test_inference_mode_and_autocast_give_float32_records(net: Net) -> None:
    x = torch.randn(N, 3, H, W)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = net(x)
        with capture_attention(net, derived=True) as cap:
            captured = net(x)
    assert plain.dtype == torch.bfloat16 and torch.equal(plain, captured)
    assert summary(cap.records) == EXPECTED
    assert all(r.tensor.dtype == torch.float32 for r in cap.records)
    assert all(r.tensor.min() >= 0 and r.tensor.max() <= 1 for r in cap.records if r.derived)


def test_each_call_of_a_block_gives_its_own_records() -> None:
    block = SE(C).eval()
    with torch.no_grad(), capture_attention(block) as cap:
        block(torch.randn(1, C, 4, 4))
        block(torch.randn(3, C, 5, 5))
    assert [(r.site, tuple(r.tensor.shape)) for r in cap.records] == [("", (1, C)), ("", (3, C))]


def test_se_retention_map_matches_its_formula() -> None:
    block = SE(C).eval()
    x = torch.randn(N, C, H, W)
    with torch.no_grad(), capture_attention(block, derived=True) as cap:
        block(x)
    gate, view = (r.tensor for r in cap.records)
    mass = x.abs()
    expected = (gate[:, :, None, None] * mass).sum(1, keepdim=True) / (
        mass.sum(1, keepdim=True) + 1e-6
    )
    torch.testing.assert_close(view, expected)


def test_coordatt_view_is_mean_of_gate_product() -> None:
    block = CoordAtt(C).eval()
    with torch.no_grad(), capture_attention(block, derived=True) as cap:
        block(torch.randn(N, C, H, W))
    gate_h, gate_w, view = (r.tensor for r in cap.records)
    torch.testing.assert_close(view, (gate_h * gate_w).mean(1, keepdim=True))


def test_sk_view_is_share_of_dilated_branch() -> None:
    block = SKConv(C, C).eval()
    x = torch.randn(N, C, H, W)
    with torch.no_grad(), capture_attention(block, derived=True) as cap:
        block(x)
        u = [branch(x) for branch in block.branches]
    branch, view = (r.tensor for r in cap.records)
    mass = [(branch[:, m, :, None, None] * u[m]).sum(1, keepdim=True) for m in range(2)]
    torch.testing.assert_close(view, mass[1] / (mass[0] + mass[1] + 1e-6))
