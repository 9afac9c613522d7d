"""Selective Kernel Networks (Li, Wang, Hu, Yang; CVPR 2019), arXiv:1903.06586.

SK is **not** an add-on block: :class:`SKConv` replaces the 3x3 (group) convolution of a
bottleneck (1x1 reduce -> SKConv -> 1x1 increase), so it takes ``(in_channels, out_channels,
stride)`` and its output already has BN + ReLU applied per branch, as in the official model.

Follows the official ``sknet50.prototxt`` (implus/SKNet):
- split: M = 2 branches, 3x3 group convs (G = 32) with dilation 1 and 2 (padding = dilation; the
  "5x5" kernel is a dilated 3x3), no bias, each + BN + ReLU; stride on both branches;
- fuse: U = sum_m U_m, s = GAP(U), z = ReLU(BN(1x1 conv C -> d, no bias)), d = max(C // r, L),
  r = 16, L = 32, with C = ``out_channels`` (what fc1 consumes);
- select: 1x1 conv d -> M*C (no bias), reshaped (N, M, C), softmax over M; V = sum_m a_m * U_m.
Official fillers (:meth:`SKConv.reset_parameters`): msra (kaiming fan_in) convs, N(0, 0.01) fcs.
Caffe's BN momentum 0.95 would be PyTorch momentum 0.05; PyTorch's default 0.1 is kept.

Groups: the effective group count is ``min(groups, in_channels, out_channels)`` so that narrow
layers (fewer than 32 channels) become depthwise-like; it must divide both channel counts, else a
ValueError is raised. G = 32 with C not divisible by 32 is a project variant, not the paper.

What common versions get wrong: a real 5x5 kernel, conv biases, Linear fcs without BN, an extra
BN after SKConv (pppLang/SKNet); four branches incl. 1x1, groups = 1 (External-Attention-pytorch);
no L floor, input split across paths (timm ``SelectiveKernel``); using SK as a post-block add-on.
Params: M(9C^2/G + 2C) + Cd + 2d + MCd (for in = out = C).
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import Tap


def _effective_groups(in_channels: int, out_channels: int, groups: int) -> int:
    """``min(groups, in, out)``; raises ValueError unless it divides both channel counts."""
    if min(in_channels, out_channels, groups) < 1:
        raise ValueError(
            f"SKConv needs positive channels and groups, got in={in_channels}, "
            f"out={out_channels}, groups={groups}"
        )
    g = min(groups, in_channels, out_channels)
    if in_channels % g or out_channels % g:
        raise ValueError(
            f"SKConv groups={g} must divide in_channels={in_channels} and "
            f"out_channels={out_channels}; pick widths divisible by {g} or pass groups=..."
        )
    return g


def _branch(
    in_channels: int, out_channels: int, stride: int, dilation: int, groups: int
) -> nn.Sequential:
    """One path: 3x3 group conv (padding = dilation, no bias) + BN + ReLU."""
    conv = nn.Conv2d(in_channels, out_channels, 3, stride, dilation, dilation, groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SKConv(nn.Module):
    """Selective kernel convolution (M dilated 3x3 group-conv branches, softmax selection)."""

    block_name = "sk"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        branches: int = 2,
        groups: int = 32,
        reduction: int = 16,
        min_dim: int = 32,
    ) -> None:
        super().__init__()
        if branches < 2 or reduction < 1 or min_dim < 1:
            raise ValueError(
                f"SKConv needs branches >= 2, reduction >= 1 and min_dim >= 1, got "
                f"{branches}, {reduction}, {min_dim}"
            )
        self.groups = _effective_groups(in_channels, out_channels, groups)
        self.out_channels = out_channels
        dim = max(out_channels // reduction, min_dim)
        self.branches = nn.ModuleList(
            _branch(in_channels, out_channels, stride, 1 + m, self.groups) for m in range(branches)
        )
        self.feature = Tap("feature")
        self.fc1 = nn.Sequential(
            nn.Conv2d(out_channels, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True)
        )
        self.fc2 = nn.Conv2d(dim, branches * out_channels, 1, bias=False)
        self.gate = Tap("branch", nn.Softmax(dim=1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official fillers: msra (kaiming fan_in) branch convs, gaussian std 0.01 fcs, BN 1/0."""
        for branch in self.branches:
            nn.init.kaiming_normal_(branch[0].weight, mode="fan_in", nonlinearity="relu")
            branch[1].reset_parameters()
        nn.init.normal_(self.fc1[0].weight, std=0.01)
        self.fc1[1].reset_parameters()
        nn.init.normal_(self.fc2.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.feature(branch(x)) for branch in self.branches]
        fused = feats[0]
        for f in feats[1:]:
            fused = fused + f
        logits = self.fc2(self.fc1(fused.mean((2, 3), keepdim=True)))
        a = self.gate(logits.reshape(x.shape[0], len(feats), self.out_channels))
        out = feats[0] * a[:, 0, :, None, None]
        for m, f in enumerate(feats[1:], start=1):
            out = out + f * a[:, m, :, None, None]
        return out
