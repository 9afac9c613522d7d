"""GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond (Cao et al.; ICCVW 2019),
arXiv:1904.11492.

Follows the official ``ContextBlock`` (xvjiarui/GCNet ``mmdet/ops/gcb/context_block.py``, same
in mmcv) with its defaults: 'att' pooling (``conv_mask`` C -> 1 with bias, softmax over the H*W
positions, attention-weighted sum of X) and the 'channel_add' fusion Y = X + t, where
t = conv(P -> C)(ReLU(LayerNorm([P, 1, 1])(conv(C -> P)(context)))), P = int(C * ratio),
ratio = 1/16 (a multiplier, not a reduction). Submodule names match the official ones.
Official init, applied by :meth:`GC.reset_parameters`: kaiming-normal fan_in ``conv_mask`` and
``last_zero_init`` of the final conv, so the block starts as the identity.

What common versions get wrong: ``ratio=16`` read as a reduction (P = 16C); dropping the zero
init; softmax over the wrong axis (all ones, a sum instead of a weighted mean). timm's
``GlobalContext`` defaults to a sigmoid channel-mul fusion, ratio 1/8 and no zero init.
Params: 2CP + 3P + 2C + 1.
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import Tap


class SpatialSoftmax(nn.Module):
    """Softmax over all H*W positions of an (N, 1, H, W) map, so each map sums to 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).softmax(dim=-1).reshape(x.shape)


class GC(nn.Module):
    """Global context block (att pooling, channel_add fusion); keeps the input shape."""

    block_name = "gc"

    def __init__(self, channels: int, ratio: float = 1 / 16) -> None:
        super().__init__()
        planes = int(channels * ratio)
        if planes < 1:
            raise ValueError(
                f"GC needs int(channels * ratio) >= 1 (ratio is a multiplier such as 1/16), "
                f"got channels={channels}, ratio={ratio}"
            )
        self.planes = planes
        self.conv_mask = nn.Conv2d(channels, 1, 1)
        self.context = Tap("context", SpatialSoftmax())
        self.channel_add_conv = nn.Sequential(
            nn.Conv2d(channels, planes, 1),
            nn.LayerNorm([planes, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, channels, 1),
        )
        self.channel_add = Tap("channel")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: kaiming fan_in mask conv (bias 0), last conv zeros (identity block)."""
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        self.channel_add_conv[0].reset_parameters()
        self.channel_add_conv[1].reset_parameters()
        nn.init.zeros_(self.channel_add_conv[3].weight)
        nn.init.zeros_(self.channel_add_conv[3].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        mask = self.context(self.conv_mask(x))
        context = torch.bmm(x.flatten(2), mask.flatten(2).transpose(1, 2).to(x.dtype))
        return x + self.channel_add(self.channel_add_conv(context.reshape(n, c, 1, 1)))
