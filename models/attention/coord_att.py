"""Coordinate Attention for Efficient Mobile Network Design (Hou, Zhou, Feng; CVPR 2021),
arXiv:2103.02907.

Follows the official ``CoordAtt`` (houqb/CoordAttention ``coordatt.py``; same maths in
``mbv2_ca.py``): average-pool along W (-> (N, C, H, 1)) and along H (-> (N, C, 1, W), permuted),
concatenate along H, a shared 1x1 conv C -> mip (bias) + BN + h_swish, split, then 1x1 convs
mip -> C (bias) + sigmoid give ``a_h`` (N, C, H, 1) and ``a_w`` (N, C, 1, W); Y = X * a_w * a_h.
mip = max(min_mip, C // reduction) with min_mip = 8 and reduction = 32 (``mbv2_ca.py`` calls the
reduction ``groups``; it is not a conv group count). h_swish is ``nn.Hardswish`` (identical
maths). Submodule names follow ``coordatt.py`` (``conv1``, ``bn1``, ``conv_h``, ``conv_w``).

What common versions get wrong: an undefined ``h_swish`` (NameError); passing ``groups`` to
``nn.Conv2d``; forgetting to permute ``x_w`` back before ``conv_w``. timm's ``CoordAttn`` uses a
different width rule and bias-free convs. The paper places the block inside MobileNetV2's inverted
residual; a ResNet placement (before the residual addition, like SE) is this project's choice.
Params: 3C*mip + 3mip + 2C.
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import Tap


class CoordAtt(nn.Module):
    """Coordinate attention: direction-aware gates along H and W; keeps the input shape."""

    block_name = "coordatt"

    def __init__(self, channels: int, reduction: int = 32, min_mip: int = 8) -> None:
        super().__init__()
        if channels < 1 or reduction < 1 or min_mip < 1:
            raise ValueError(
                f"CoordAtt needs positive channels, reduction and min_mip, got "
                f"{channels}, {reduction}, {min_mip}"
            )
        mip = max(min_mip, channels // reduction)
        self.mip = mip
        self.conv1 = nn.Conv2d(channels, mip, 1)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = nn.Hardswish()
        self.conv_h = nn.Conv2d(mip, channels, 1)
        self.conv_w = nn.Conv2d(mip, channels, 1)
        self.gate_h = Tap("coord_h", nn.Sigmoid())
        self.gate_w = Tap("coord_w", nn.Sigmoid())

    def reset_parameters(self) -> None:
        """PyTorch default init of every layer (the official code has no special init)."""
        for layer in (self.conv1, self.bn1, self.conv_h, self.conv_w):
            layer.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        pooled = torch.cat((x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)), 2)
        y = self.act(self.bn1(self.conv1(pooled)))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = self.gate_h(self.conv_h(y_h))
        a_w = self.gate_w(self.conv_w(y_w.transpose(2, 3)))
        return x * a_w * a_h
