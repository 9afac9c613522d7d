"""Spatial Transformer Networks (Jaderberg, Simonyan, Zisserman, Kavukcuoglu; NeurIPS 2015),
arXiv:1506.02025.

A localisation network regresses the parameters theta of a transform T_theta; the grid
generator maps each output (target) coordinate to an input (source) coordinate,
(x_s, y_s) = A_theta (x_t, y_t, 1), in normalised coordinates [-1, 1]; a bilinear sampler fills
the output, so the module is differentiable end to end (paper Eqs. 1-5). Transforms:
- "affine" (default): A_theta, 6 free parameters;
- "attention": the paper's attention-restricted transform A = [[s, 0, t_x], [0, s, t_y]]
  (isotropic scale and translation, 3 parameters).
The localisation net is a small conv net whose final regression layer is initialised to the
identity transform (weights zero, bias = identity), as the paper does. The sampler is
``F.affine_grid`` + ``F.grid_sample`` (bilinear, zero padding) with ``align_corners=False``:
-1 and 1 are the outer edges of the corner pixels, so a theta means the same region at every
resolution and a half-size crop of a quadrant samples exactly that quadrant's pixel centres.
``output_size`` sets the sampled resolution (None: the input's); the paper samples a smaller
output than its input for the cluttered-digit task.

Records (only while captured): ``theta`` (N, 2, 3); ``crop`` (N, C, h, w), the transformed
input; ``region`` (N, 4, 2), the corners of the sampled quadrilateral as (x, y) in the input's
pixel coordinates (pixel edges: the input spans [0, W] x [0, H]), in the order top-left,
top-right, bottom-right, bottom-left of the output; ``spatial`` (N, 1, H, W), the sampling
density: each sampling point's four bilinear weights splatted onto the input grid, so the map
says how much of the output draws on each input pixel (genuine, not derived; it sums to h * w
where every sample lands inside the input).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .capture import Tap, TapOutputs

TRANSFORMS = {"affine": 6, "attention": 3}
_CORNERS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))


class SpatialTransformer(nn.Module):
    """Localisation net -> theta -> affine grid -> bilinear sampler; (N, C, H, W) ->
    (N, C, h, w) with (h, w) = `output_size` (default: the input size)."""

    block_name = "stn"
    computed_kinds = ("region", "spatial")

    def __init__(
        self,
        channels: int,
        transform: str = "affine",
        output_size: int | Sequence[int] | None = None,
        hidden: int = 20,
        fc_width: int = 50,
        pool_size: int = 8,
    ) -> None:
        super().__init__()
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {transform!r}; valid: {list(TRANSFORMS)}")
        self.transform = transform
        self.output_size = _output_size(output_size)
        self.localization = nn.Sequential(
            nn.MaxPool2d(2),
            nn.Conv2d(channels, hidden, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(hidden, hidden, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(pool_size),
            nn.Flatten(),
            nn.Linear(hidden * pool_size * pool_size, fc_width),
            nn.ReLU(inplace=True),
        )
        self.regress = nn.Linear(fc_width, TRANSFORMS[transform])
        self.theta = Tap("theta")
        self.crop = Tap("crop")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default init for the localisation net; the regression layer outputs the identity."""
        for module in self.localization.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                module.reset_parameters()
        nn.init.zeros_(self.regress.weight)
        identity = [1.0, 0.0, 0.0] if self.transform == "attention" else [1, 0, 0, 0, 1, 0]
        with torch.no_grad():
            self.regress.bias.copy_(torch.tensor(identity, dtype=torch.float32))

    def extra_repr(self) -> str:
        return f"transform={self.transform!r}, output_size={self.output_size}"

    def forward_theta(self, x: torch.Tensor) -> torch.Tensor:
        """theta (N, 2, 3) of the input x."""
        params = self.regress(self.localization(x))
        if self.transform == "attention":
            scale, tx, ty = params.unbind(1)
            zero = torch.zeros_like(scale)
            params = torch.stack((scale, zero, tx, zero, scale, ty), dim=1)
        return params.view(-1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.theta(self.forward_theta(x))
        height, width = self.output_size or (x.shape[-2], x.shape[-1])
        grid = F.affine_grid(theta, [x.shape[0], x.shape[1], height, width], align_corners=False)
        return self.crop(
            F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )

    def computed_records(self, x: torch.Tensor, taps: TapOutputs) -> dict[str, torch.Tensor]:
        """The records computed from theta while captured: region and sampling density."""
        theta = taps["theta"][0].float()
        crop = taps["crop"][0]
        size = (int(x.shape[-2]), int(x.shape[-1]))
        grid = F.affine_grid(theta, list(crop.shape), align_corners=False)
        return {
            "region": region_corners(theta, size),
            "spatial": sampling_density(grid, x.float()),
        }


def region_corners(theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 4, 2) corners of the sampled region, (x, y) in input pixels (edges: [0, W], [0, H])."""
    corners = torch.tensor([[x, y, 1.0] for x, y in _CORNERS], dtype=theta.dtype)
    source = torch.einsum("kj,nij->nki", corners.to(theta.device), theta)
    scale = torch.tensor([size[1], size[0]], dtype=theta.dtype, device=theta.device)
    return (source + 1.0) * scale / 2.0


def box_theta(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 2, 3) theta of the attention-restricted form that samples exactly each box
    (x0, y0, x1, y1) in input pixels (edges): the inverse of `region_corners` for such a theta."""
    boxes = boxes.to(torch.float32)
    height, width = float(size[0]), float(size[1])
    scale_x = (boxes[:, 2] - boxes[:, 0]) / width
    scale_y = (boxes[:, 3] - boxes[:, 1]) / height
    shift_x = (boxes[:, 0] + boxes[:, 2]) / width - 1.0
    shift_y = (boxes[:, 1] + boxes[:, 3]) / height - 1.0
    zero = torch.zeros_like(scale_x)
    return torch.stack((scale_x, zero, shift_x, zero, scale_y, shift_y), dim=1).view(-1, 2, 3)


def sampling_density(grid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W): the bilinear weights of every sampling point of `grid` (N, h, w, 2,
    normalised, align_corners=False) summed on the grid of the input `x` (N, C, H, W).

    Exactly the weights ``grid_sample`` reads each input pixel with (zero padding: weights on
    pixels outside the input are dropped), i.e. its adjoint applied to an all-ones output.
    """
    height, width = x.shape[-2], x.shape[-1]
    px = ((grid[..., 0] + 1.0) * width - 1.0) / 2.0
    py = ((grid[..., 1] + 1.0) * height - 1.0) / 2.0
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0
    density = torch.zeros_like(x[:, 0]).flatten(1)
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        weight = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy)
        inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
        index = yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)
        density = density.scatter_add(
            1, index.long().flatten(1), (weight * inside.to(weight.dtype)).flatten(1)
        )
    return density.view_as(x[:, :1])


def _output_size(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"output_size must be a positive int or (h, w), got {value!r}")
    return (int(value[0]), int(value[1]))
