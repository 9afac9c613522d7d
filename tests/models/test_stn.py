"""The spatial transformer block: sampler geometry, records, gradients, placement and registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import ATTENTION_BLOCKS, capture_attention, create_model, list_models, list_sites
from models.attention import SpatialTransformer, spatial_views, split_attention, summary_map
from models.attention.stn import box_theta, region_corners, sampling_density

QUADRANTS = {  # (tx, ty) of a half-size crop -> (row slice, column slice) of a 16x24 input
    (-0.5, -0.5): (slice(0, 8), slice(0, 12)),
    (0.5, -0.5): (slice(0, 8), slice(12, 24)),
    (-0.5, 0.5): (slice(8, 16), slice(0, 12)),
    (0.5, 0.5): (slice(8, 16), slice(12, 24)),
}


def _fixed(stn: SpatialTransformer, theta: list[float]) -> SpatialTransformer:
    """Make the localisation net output `theta` (its regression bias) for every input."""
    with torch.no_grad():
        stn.regress.weight.zero_()
        stn.regress.bias.copy_(torch.tensor(theta))
    return stn.eval()


def _records(module: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad(), capture_attention(module) as cap:
        module(x)
    return {r.kind: r.tensor for r in cap.records}


def test_identity_init_reproduces_the_input() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 2, 16, 24)
    for transform in ("affine", "attention"):
        stn = SpatialTransformer(2, transform=transform).eval()
        assert torch.count_nonzero(stn.regress.weight) == 0
        with torch.no_grad():
            out = stn(x)
        # exact up to float rounding of the normalised grid (pixel centres hit exactly)
        torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("shift", "window"), QUADRANTS.items())
def test_half_size_theta_samples_exactly_one_quadrant(shift, window) -> None:
    x = torch.randn(2, 3, 16, 24)
    stn = _fixed(SpatialTransformer(3, output_size=(8, 12)), [0.5, 0, shift[0], 0, 0.5, shift[1]])
    rows, cols = window
    records = _records(stn, x)
    with torch.no_grad():
        torch.testing.assert_close(stn(x), x[:, :, rows, cols], rtol=0, atol=1e-5)
    # region: the quadrant's pixel edges, corners top-left, top-right, bottom-right, bottom-left
    x0, x1, y0, y1 = cols.start, cols.stop, rows.start, rows.stop
    expected = torch.tensor([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=torch.float32)
    torch.testing.assert_close(records["region"], expected.expand(2, 4, 2), rtol=0, atol=1e-5)
    # density: every sample on a pixel centre of the quadrant, weight 1 each
    density = records["spatial"][:, 0]
    inside = torch.zeros(16, 24)
    inside[rows, cols] = 1.0
    torch.testing.assert_close(density, inside.expand(2, 16, 24), rtol=0, atol=1e-5)


def test_align_corners_false_is_what_makes_the_quadrant_exact() -> None:
    """With align_corners=True, -1/1 are corner pixel centres: the same theta samples between
    pixels and blurs; the block uses False so a theta is resolution-independent."""
    x = torch.randn(1, 1, 16, 24)
    theta = torch.tensor([[[0.5, 0, -0.5], [0, 0.5, -0.5]]])
    grid = F.affine_grid(theta, [1, 1, 8, 12], align_corners=True)
    other = F.grid_sample(x, grid, align_corners=True)
    assert not torch.allclose(other, x[:, :, :8, :12], atol=1e-3)


def test_region_corners_follow_theta() -> None:
    torch.manual_seed(1)
    theta = torch.randn(5, 2, 3) * 0.4
    corners = region_corners(theta, (16, 24))
    for n in range(5):
        for k, (u, v) in enumerate(((-1, -1), (1, -1), (1, 1), (-1, 1))):
            xs, ys = theta[n] @ torch.tensor([u, v, 1.0])
            expected = torch.stack(((xs + 1) * 24 / 2, (ys + 1) * 16 / 2))
            torch.testing.assert_close(corners[n, k], expected)


def test_box_theta_samples_exactly_the_box() -> None:
    boxes = torch.tensor([[0, 0, 24, 16], [3, 5, 11, 13], [10, 2, 22, 10]])
    theta = box_theta(boxes, (16, 24))
    corners = region_corners(theta, (16, 24))
    x0, y0, x1, y1 = boxes.float().unbind(1)
    expected = torch.stack([torch.stack(p, 1) for p in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))], 1)
    torch.testing.assert_close(corners, expected)
    assert torch.equal(theta[0], torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))  # the whole input
    x = torch.arange(16 * 24, dtype=torch.float32).view(1, 1, 16, 24)
    stn = _fixed(SpatialTransformer(1, output_size=(8, 8)), theta[1].flatten().tolist())
    torch.testing.assert_close(stn(x), x[..., 5:13, 3:11])  # an 8x8 box at 8x8: its pixels


def test_density_sums_to_the_output_size_and_stays_in_the_region() -> None:
    theta = torch.tensor([[[0.37, 0.1, 0.2], [-0.05, 0.41, -0.15]]])  # rotated, inside the input
    x = torch.zeros(1, 1, 32, 40)
    grid = F.affine_grid(theta, [1, 1, 11, 13], align_corners=False)
    density = sampling_density(grid, x)[0, 0]
    assert density.sum().item() == pytest.approx(11 * 13, rel=1e-5)
    assert (density >= 0).all()
    corners = region_corners(theta, (32, 40))[0]
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(40) + 0.5, indexing="ij")
    # distance of every pixel centre beyond each edge (normals point away from the centre)
    edges = corners.roll(-1, 0) - corners
    normal = torch.stack((edges[:, 1], -edges[:, 0]), 1)
    normal = normal / normal.norm(dim=1, keepdim=True)
    normal = normal * torch.sign(((corners - corners.mean(0)) * normal).sum(1, keepdim=True))
    beyond = (xs[None] - corners[:, 0, None, None]) * normal[:, 0, None, None] + (
        ys[None] - corners[:, 1, None, None]
    ) * normal[:, 1, None, None]
    far = beyond.amax(0) > 1.0  # a bilinear weight reaches at most one pixel from a sample
    assert far.sum() > 1000 and density[far].abs().max() == 0
    assert density[beyond.amax(0) < -1.0].min() > 0  # and it covers the region's inside
    # and the density is exactly what grid_sample reads: its adjoint applied to ones
    image = torch.zeros(1, 1, 32, 40, requires_grad=True)
    F.grid_sample(image, grid, align_corners=False).sum().backward()
    torch.testing.assert_close(density, image.grad[0, 0], rtol=0, atol=1e-5)


def test_density_loses_the_samples_that_fall_outside() -> None:
    theta = torch.tensor([[[1.0, 0, 1.0], [0, 1.0, 0]]])  # shifted right by half the width
    grid = F.affine_grid(theta, [1, 1, 8, 8], align_corners=False)
    density = sampling_density(grid, torch.zeros(1, 1, 8, 8))
    assert density.sum().item() == pytest.approx(32, abs=1e-4)


def test_gradients_flow_to_theta_and_the_localisation_net() -> None:
    torch.manual_seed(2)
    stn = SpatialTransformer(1, transform="attention", output_size=8)
    x = torch.randn(4, 1, 16, 16)
    stn(x).pow(2).sum().backward()
    assert stn.regress.bias.grad is not None and stn.regress.bias.grad.abs().sum() > 0
    assert stn.regress.weight.grad.abs().sum() > 0
    theta = stn.forward_theta(x).detach().requires_grad_(True)
    grid = F.affine_grid(theta, [4, 1, 8, 8], align_corners=False)
    F.grid_sample(x, grid, align_corners=False).sum().backward()
    assert theta.grad.abs().sum() > 0


def test_attention_transform_is_scale_and_translation() -> None:
    stn = _fixed(SpatialTransformer(1, transform="attention"), [0.4, 0.2, -0.3])
    theta = _records(stn, torch.randn(2, 1, 20, 20))["theta"]
    expected = torch.tensor([[0.4, 0.0, 0.2], [0.0, 0.4, -0.3]]).expand(2, 2, 3)
    torch.testing.assert_close(theta, expected)


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="transform"):
        SpatialTransformer(1, transform="projective")
    with pytest.raises(ValueError, match="output_size"):
        SpatialTransformer(1, output_size=(0, 4))
    with pytest.raises(ValueError, match="stn_stage"):
        create_model("resnet_small", "stn", stn_stage=9)
    with pytest.raises(ValueError, match="apply only"):
        create_model("resnet_small", "cbam", stn_kwargs={"output_size": 8})


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """A non-identity localisation output, as after training."""
    torch.manual_seed(3)
    with torch.no_grad():
        model.stn.regress.weight.normal_(0, 0.05)
    return model.eval()


def test_capture_and_batching_do_not_change_the_logits() -> None:
    model = _randomised(create_model("resnet_small", "stn+cbam", stn_kwargs={"output_size": 32}))
    x = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        plain = model(x)
        with capture_attention(model, derived=True) as cap:
            captured = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(4)])
    assert torch.equal(plain, captured)
    torch.testing.assert_close(single, plain, rtol=0, atol=1e-5)
    # the summary is the density alone: the CBAM maps after the transformer are on the crop
    views = spatial_views(cap.records)
    assert [(v.site, v.kind) for v in views] == [("stn", "spatial")]
    expected = summary_map(views, (64, 64))
    torch.testing.assert_close(summary_map(cap.records, (64, 64)), expected)


STN_SHAPES = {"theta": (2, 3), "region": (4, 2)}
COMBINATIONS = [b for b in ATTENTION_BLOCKS if "+" in b]


def test_the_declared_combinations() -> None:
    assert "stn" in ATTENTION_BLOCKS
    assert [f"stn+{b}" for b in ("se", "eca", "cbam", "gc", "coordatt", "sk")] == COMBINATIONS
    assert split_attention("stn+cbam") == ("stn", "cbam")
    assert split_attention("stn") == ("stn", "none") and split_attention("se") == (None, "se")
    with pytest.raises(ValueError, match="unknown attention block"):
        create_model("resnet_small", "cbam+stn")


def _check_stn_records(model, x: torch.Tensor, out_hw: tuple[int, int], where: int) -> None:
    with torch.no_grad(), capture_attention(model) as cap:
        logits = model(x)
    assert logits.shape == (x.shape[0], model.num_classes)
    stn = {r.kind: r.tensor for r in cap.records if r.site == "stn"}
    assert list(stn) == ["theta", "crop", "region", "spatial"]
    n = x.shape[0]
    for kind, shape in STN_SHAPES.items():
        assert stn[kind].shape == (n, *shape)
    channels, grid = stn["crop"].shape[1], stn["spatial"].shape[-2:]
    assert stn["crop"].shape == (n, channels, *out_hw)
    assert stn["spatial"].shape == (n, 1, *grid)
    if where == 0:
        assert channels == x.shape[1] and tuple(grid) == tuple(x.shape[-2:])
    kinds = next(s.kinds for s in list_sites(model) if s.site == "stn")
    assert kinds == ("theta", "crop", "region", "spatial")


@pytest.mark.parametrize("arch", list_models())
def test_every_arch_takes_a_front_transformer(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch, "stn", num_classes=10).eval()
    channels = model.in_chans
    _check_stn_records(model, torch.randn(2, channels, 48, 40), (48, 40), 0)


@pytest.mark.parametrize("attention", COMBINATIONS)
def test_every_combination_runs_with_the_documented_records(attention: str) -> None:
    model = create_model("resnet_small", attention, stn_kwargs={"output_size": [24, 24]}).eval()
    _check_stn_records(model, torch.randn(2, 1, 48, 48), (24, 24), 0)
    residual = split_attention(attention)[1]
    assert any(s.block == residual for s in list_sites(model))


def test_a_transformer_before_a_later_stage() -> None:
    model = create_model("resnet18", "stn", num_classes=10, stn_stage=2).eval()
    assert model.stn.localization[1].in_channels == 64  # layer1's output feeds layer2
    _check_stn_records(model, torch.randn(1, 3, 64, 64), (16, 16), 2)
