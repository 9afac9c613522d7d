"""Attention blocks: shapes, gate ranges, official inits, parameter formulas and the maths.

Each block's output is recomputed here from its own state_dict with torch.nn.functional, so the
tests check the formula, not the module against itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.attention import (
    ATTENTION_BLOCKS,
    CBAM,
    ECA,
    GC,
    SE,
    CoordAtt,
    SKConv,
    SpatialTransformer,
    capture_attention,
    create_attention,
    eca_kernel_size,
)

ADD_ON = ("se", "eca", "cbam", "gc", "coordatt")
TOL = {"atol": 1e-5, "rtol": 1e-4}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics, so no term of the formula is trivially 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)
    return module.eval()


def make_block(name: str, channels: int = 64) -> nn.Module:
    return SKConv(channels, channels) if name == "sk" else create_attention(name, channels)


def bn_eval(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    return F.batch_norm(
        x,
        sd[f"{prefix}.running_mean"],
        sd[f"{prefix}.running_var"],
        sd[f"{prefix}.weight"],
        sd[f"{prefix}.bias"],
        training=False,
        eps=1e-5,
    )


def ref_se(x: torch.Tensor, sd: dict) -> torch.Tensor:
    h = F.relu(F.linear(x.mean((2, 3)), sd["fc1.weight"].flatten(1), sd["fc1.bias"]))
    s = torch.sigmoid(F.linear(h, sd["fc2.weight"].flatten(1), sd["fc2.bias"]))
    return x * s[:, :, None, None]


def ref_eca(x: torch.Tensor, sd: dict) -> torch.Tensor:
    kernel = sd["conv.weight"][0, 0]
    half = (kernel.numel() - 1) // 2
    padded = F.pad(x.mean((2, 3)), (half, half))  # zero padding at both channel ends
    gate = torch.sigmoid(padded.unfold(1, kernel.numel(), 1) @ kernel)
    return x * gate[:, :, None, None]


def ref_cbam(x: torch.Tensor, sd: dict) -> torch.Tensor:
    def mlp(v: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(F.linear(v, sd["mlp.0.weight"], sd["mlp.0.bias"]))
        return F.linear(hidden, sd["mlp.2.weight"], sd["mlp.2.bias"])

    gate = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.flatten(2).max(2).values))
    f = x * gate[:, :, None, None]
    pooled = torch.cat([f.max(1, keepdim=True).values, f.mean(1, keepdim=True)], 1)
    weight = sd["spatial_conv.weight"]
    logits = F.conv2d(pooled, weight, padding=weight.shape[-1] // 2)
    return f * torch.sigmoid(bn_eval(logits, sd, "spatial_bn"))


def ref_gc(x: torch.Tensor, sd: dict) -> torch.Tensor:
    n, _, h, w = x.shape
    logits = F.conv2d(x, sd["conv_mask.weight"], sd["conv_mask.bias"]).reshape(n, h * w)
    mask = torch.softmax(logits, dim=1).reshape(n, h, w)
    context = torch.einsum("nchw,nhw->nc", x, mask)
    t = F.linear(context, sd["channel_add_conv.0.weight"].flatten(1), sd["channel_add_conv.0.bias"])
    planes = t.shape[1]
    ln_w, ln_b = sd["channel_add_conv.1.weight"], sd["channel_add_conv.1.bias"]
    t = F.layer_norm(t.reshape(n, planes, 1, 1), [planes, 1, 1], ln_w, ln_b, eps=1e-5)
    t = F.linear(F.relu(t.flatten(1)), sd["channel_add_conv.3.weight"].flatten(1))
    return x + (t + sd["channel_add_conv.3.bias"])[:, :, None, None]


def ref_coordatt(x: torch.Tensor, sd: dict) -> torch.Tensor:
    h = x.shape[2]
    z = torch.cat([x.mean(3), x.mean(2)], dim=2)  # (N, C, H + W)
    y = torch.einsum("mc,nck->nmk", sd["conv1.weight"][:, :, 0, 0], z) + sd["conv1.bias"][:, None]
    y = bn_eval(y, sd, "bn1")
    y = y * torch.clamp(y + 3, 0, 6) / 6  # h_swish

    def gate(conv: str, part: torch.Tensor) -> torch.Tensor:
        weight, bias = sd[f"{conv}.weight"][:, :, 0, 0], sd[f"{conv}.bias"][:, None]
        return torch.sigmoid(torch.einsum("cm,nmk->nck", weight, part) + bias)

    a_h, a_w = gate("conv_h", y[:, :, :h]), gate("conv_w", y[:, :, h:])
    return x * a_h[:, :, :, None] * a_w[:, :, None, :]


def ref_sk(x: torch.Tensor, sd: dict, stride: int, groups: int) -> torch.Tensor:
    feats = []
    for m in range(2):
        u = F.conv2d(
            x, sd[f"branches.{m}.0.weight"], None, stride, 1 + m, 1 + m, groups
        )  # dilated 3x3: the paper's "5x5" for m = 1
        feats.append(F.relu(bn_eval(u, sd, f"branches.{m}.1")))
    z = F.relu(
        bn_eval(
            F.linear((feats[0] + feats[1]).mean((2, 3)), sd["fc1.0.weight"][..., 0, 0]), sd, "fc1.1"
        )
    )
    logits = F.linear(z, sd["fc2.weight"][..., 0, 0]).reshape(x.shape[0], 2, -1)
    a = torch.softmax(logits, dim=1)
    return a[:, 0, :, None, None] * feats[0] + a[:, 1, :, None, None] * feats[1]


REFERENCES = {
    "se": ref_se,
    "eca": ref_eca,
    "cbam": ref_cbam,
    "gc": ref_gc,
    "coordatt": ref_coordatt,
    "sk": lambda x, sd: ref_sk(x, sd, stride=1, groups=32),
}


@pytest.mark.parametrize("name", [*ADD_ON, "sk"])
@pytest.mark.parametrize("shape", [(2, 64, 13, 21), (2, 64, 16, 16), (1, 64, 5, 3)])
def test_output_equals_reference_formula(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    block = randomize(make_block(name))
    x = torch.randn(shape)
    with torch.no_grad():
        y = block(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, REFERENCES[name](x, block.state_dict()), **TOL)


def test_sk_stride_and_small_width_match_reference() -> None:
    block = randomize(SKConv(16, 16, stride=2))
    assert block.groups == 16  # min(32, channels) for narrow layers
    x = torch.randn(2, 16, 13, 21)
    with torch.no_grad():
        y = block(x)
    assert y.shape == (2, 16, 7, 11)
    torch.testing.assert_close(y, ref_sk(x, block.state_dict(), stride=2, groups=16), **TOL)


@pytest.mark.parametrize("name", [*ADD_ON, "sk"])
def test_shape_kept_in_train_mode_and_batch_one_in_eval(name: str) -> None:
    block = make_block(name).train()
    assert block(torch.randn(2, 64, 13, 21)).shape == (2, 64, 13, 21)
    block.eval()
    with torch.no_grad():
        assert block(torch.randn(1, 64, 9, 9)).shape == (1, 64, 9, 9)


@pytest.mark.parametrize("name", [*ADD_ON, "sk"])
def test_block_name_attribute(name: str) -> None:
    assert make_block(name).block_name == name


@pytest.mark.parametrize("name", ["se", "eca", "cbam", "coordatt"])
def test_gates_lie_in_open_unit_interval(name: str) -> None:
    block = randomize(make_block(name), seed=3)
    with torch.no_grad(), capture_attention(block) as cap:
        block(torch.randn(2, 64, 13, 21))
    assert cap.records
    for record in cap.records:
        assert record.tensor.gt(0).all() and record.tensor.lt(1).all(), record.kind


def test_gc_mask_sums_to_one_and_block_is_identity_at_init() -> None:
    block = GC(64).eval()
    x = torch.randn(2, 64, 13, 21)
    with torch.no_grad(), capture_attention(block) as cap:
        y = block(x)
    assert torch.equal(y, x)
    context = next(r.tensor for r in cap.records if r.kind == "context")
    assert context.shape == (2, 1, 13, 21)
    torch.testing.assert_close(context.sum((1, 2, 3)), torch.ones(2))
    assert not torch.allclose(context, torch.full_like(context, 1 / (13 * 21)))


def test_sk_branch_weights_sum_to_one() -> None:
    block = randomize(SKConv(64, 64), seed=1)
    with torch.no_grad(), capture_attention(block) as cap:
        block(torch.randn(2, 64, 13, 21))
    (branch,) = [r.tensor for r in cap.records if r.kind == "branch"]
    assert branch.shape == (2, 2, 64)
    torch.testing.assert_close(branch.sum(1), torch.ones(2, 64))


@pytest.mark.parametrize("train", [False, True])
def test_cbam_spatial_map_is_one_half_at_init(train: bool) -> None:
    block = CBAM(64).train(train)
    with torch.no_grad(), capture_attention(block) as cap:
        block(torch.randn(2, 64, 13, 21))
    spatial = next(r.tensor for r in cap.records if r.kind == "spatial")
    assert torch.equal(spatial, torch.full((2, 1, 13, 21), 0.5))
    block.spatial_bn.weight.data.fill_(1.0)
    block.reset_parameters()
    assert torch.equal(block.spatial_bn.weight, torch.zeros(1))


def test_eca_kernel_table_and_explicit_kernel() -> None:
    table = {64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}
    assert {c: eca_kernel_size(c) for c in table} == table
    assert {c: ECA(c).conv.kernel_size[0] for c in table} == table
    assert ECA(256, kernel_size=3).conv.kernel_size == (3,)
    assert [ECA(c, kernel_size=k).kernel_size for c, k in [(256, 3), (512, 5), (1024, 7)]] == [
        3,
        5,
        7,
    ]
    with pytest.raises(ValueError, match="odd"):
        ECA(64, kernel_size=4)


@pytest.mark.parametrize("c", [64, 256, 1024, 2048])
def test_parameter_formulas(c: int) -> None:
    r, k, ratio = 16, 7, 1 / 16
    assert n_params(SE(c)) == 2 * c * c // r + c // r + c
    assert n_params(ECA(c)) == eca_kernel_size(c)
    assert n_params(CBAM(c)) == 2 * c * c // r + c // r + c + 2 * k * k + 2
    p = int(c * ratio)
    assert n_params(GC(c)) == 2 * c * p + 3 * p + 2 * c + 1
    mip = max(8, c // 32)
    assert n_params(CoordAtt(c)) == 3 * c * mip + 3 * mip + 2 * c


def test_sk_extra_parameters_over_single_group_conv() -> None:
    single = nn.Sequential(
        nn.Conv2d(128, 128, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(128)
    )
    assert n_params(SKConv(128, 128)) - n_params(single) == 17_216


def test_resnet50_parameter_totals_from_reference() -> None:
    stages = [(256, 3), (512, 4), (1024, 6), (2048, 3)]
    assert sum(n * n_params(SE(c)) for c, n in stages) == 2_530_992
    assert sum(n * n_params(CBAM(c)) for c, n in stages) == 2_532_592
    eca = [ECA(c, kernel_size=k) for (c, _), k in zip(stages, (3, 5, 5, 7), strict=True)]
    assert sum(n * n_params(b) for (_, n), b in zip(stages, eca, strict=True)) == 80
    assert sum(n * n_params(GC(c)) for c, n in stages[1:]) == 2_521_741


def test_create_attention_dispatch_and_errors() -> None:
    singles = ("none", "se", "eca", "cbam", "gc", "coordatt", "sk", "stn")
    assert (*singles, *(f"stn+{b}" for b in singles[1:7])) == ATTENTION_BLOCKS
    assert create_attention("none", 64) is None
    assert isinstance(create_attention("stn", 3, output_size=8), SpatialTransformer)
    assert isinstance(create_attention("se", 64, reduction=8), SE)
    assert create_attention("se", 64, reduction=8).fc1.out_channels == 8
    with pytest.raises(ValueError, match="SKConv"):
        create_attention("sk", 64)
    with pytest.raises(ValueError, match="coordatt"):
        create_attention("bam", 64)


def test_invalid_widths_raise_value_error() -> None:
    with pytest.raises(ValueError, match="groups"):
        SKConv(48, 48)
    with pytest.raises(ValueError, match="reduction"):
        SE(8)
    with pytest.raises(ValueError, match="reduction"):
        CBAM(8)
    with pytest.raises(ValueError, match="ratio"):
        GC(8)
