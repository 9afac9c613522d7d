"""MobileNetV2 with an attention block in every expanding inverted residual ("mobilenetv2").

MobileNetV2: Inverted Residuals and Linear Bottlenecks (Sandler et al., arXiv 1801.04381), in the
layout of the official Coordinate Attention code (houqb/CoordAttention ``mbv2_ca.py``, width 1.0):
a 3x3/2 stem of 32 channels, the seven (t, c, n, s) stages of the paper, a 1x1 conv to 1280,
global average pool, dropout 0.1 and a linear classifier; ReLU6 throughout, no activation after
the projecting 1x1 conv, a residual connection where stride is 1 and the width is unchanged.

The block sits after the depthwise 3x3 conv (+ BN + ReLU6) of every inverted residual whose
expansion ratio is above 1, acting on the expanded width, as ``mbv2_ca.py`` places Coordinate
Attention (mip = max(8, C // 32)); ``attention="coordatt"`` is that network (``mbv2_ca``).
The other add-on blocks go to the same place (a project choice); "sk" replaces a ResNet
convolution and has no place here. ``width_mult`` other than 1.0 is not provided.
Official init: convs N(0, sqrt(2 / (k*k*out))), BN 1/0, linear N(0, 0.01) with zero bias.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from models.attention import create_attention, split_attention
from models.data_config import DataConfig
from models.placement import front_block

STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
"""(expansion t, output channels c, repeats n, first stride s) per stage, as in the paper."""
STEM_WIDTH = 32
HEAD_WIDTH = 1280


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Module:
    return nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)


class InvertedResidual(nn.Module):
    """1x1 expand (absent for t = 1), depthwise 3x3, attention (t > 1), linear 1x1 projection."""

    def __init__(
        self, cin: int, cout: int, stride: int, expansion: int, attention: str, **attn_kwargs: Any
    ) -> None:
        super().__init__()
        hidden = round(cin * expansion)
        self.use_residual = stride == 1 and cin == cout
        expand = expansion != 1
        self.conv_pw = _conv(cin, hidden, 1) if expand else nn.Identity()
        self.bn1 = nn.BatchNorm2d(hidden) if expand else nn.Identity()
        self.act1 = nn.ReLU6(inplace=True) if expand else nn.Identity()
        self.conv_dw = _conv(hidden, hidden, 3, stride, groups=hidden)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act2 = nn.ReLU6(inplace=True)
        block = create_attention(attention, hidden, **attn_kwargs) if expand else None
        self.attn = block if block is not None else nn.Identity()
        self.conv_pwl = _conv(hidden, cout, 1)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv_pw(x)))
        out = self.attn(self.act2(self.bn2(self.conv_dw(out))))
        out = self.bn3(self.conv_pwl(out))
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 1.0x with the attention block a parameter; `.arch`, `.data_config` and
    `.model_kwargs` are set by `models.registry.create_model`."""

    arch: str
    data_config: DataConfig
    model_kwargs: dict[str, Any]

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        *,
        attention: str = "none",
        attn_kwargs: dict[str, Any] | None = None,
        stn_kwargs: dict[str, Any] | None = None,
        drop_rate: float = 0.1,
    ) -> None:
        super().__init__()
        # "stn" / "stn+<block>": a spatial transformer on the input image, then <block> as below
        self.stn = front_block(attention, [in_chans], 0, stn_kwargs)
        residual = split_attention(attention)[1]
        if split_attention(attention)[1] == "sk":
            raise ValueError(
                "'sk' replaces a ResNet 3x3 convolution and has no place in mobilenetv2; "
                "valid blocks here are the add-on blocks (e.g. 'coordatt', 'se', 'eca', 'cbam')"
            )
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, int | float):
            raise ValueError(f"drop_rate must be a number in [0, 1), got {drop_rate!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.num_classes, self.in_chans, self.attention = num_classes, in_chans, attention
        self.conv_stem = _conv(in_chans, STEM_WIDTH, 3, 2)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        self.act1 = nn.ReLU6(inplace=True)
        blocks, cin = [], STEM_WIDTH
        for expansion, cout, repeats, stride in STAGES:
            for i in range(repeats):
                step = stride if i == 0 else 1
                blocks.append(
                    InvertedResidual(cin, cout, step, expansion, residual, **(attn_kwargs or {}))
                )
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = _conv(cin, HEAD_WIDTH, 1)
        self.bn2 = nn.BatchNorm2d(HEAD_WIDTH)
        self.act2 = nn.ReLU6(inplace=True)
        self.num_features = HEAD_WIDTH
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(HEAD_WIDTH, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, inverted residuals and the 1x1 head conv: (N, 1280, h, w)."""
        if self.stn is not None:
            x = self.stn(x)
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        return self.act2(self.bn2(self.conv_head(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool, dropout, linear classifier."""
        return self.classifier(self.drop(torch.flatten(self.global_pool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    """The official init, skipping attention blocks (they keep their own)."""
    if getattr(module, "block_name", None) is not None:
        return
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.01)
        nn.init.zeros_(module.bias)
    for child in module.children():
        _init_weights(child)
