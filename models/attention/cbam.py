"""CBAM: Convolutional Block Attention Module (Woo, Park, Lee, Kweon; ECCV 2018), arXiv:1807.06521.

Follows the official code (Jongchan/attention-module ``MODELS/cbam.py``, ``model_resnet.py``):
- channel gate: a shared MLP C -> C//r -> C (``nn.Linear`` *with* bias, ReLU between) on the
  average- and the max-pooled vector, summed, sigmoid; r = 16;
- spatial gate on the channel-gated tensor: ChannelPool concatenates **[max, mean]** over channels
  (the paper writes [avg; max]; the order matters for weight compatibility), a 7x7 conv without
  bias, ``BatchNorm2d(1, eps=1e-5, momentum=0.01)`` (absent from the paper's Eq. 3), sigmoid;
- official init: the spatial BN weight is 0, so the spatial map starts at sigmoid(0) = 0.5; the
  spatial conv is kaiming-normal (fan_out). :meth:`CBAM.reset_parameters` applies both and runs in
  the constructor; a model that re-initialises all modules must call it again afterwards.

What common versions get wrong: spatial kernel default 3 instead of 7; MLP without bias (timm,
many blogs); no BN after the 7x7 conv and [mean, max] order (luuuyi/CBAM.PyTorch, a blog bundle,
which also ignores its ratio); an extra internal residual and a 49x49 kernel
(External-Attention-pytorch).
Params: 2C^2/r + C/r + C + 2k^2 + 2.
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import Tap


class CBAM(nn.Module):
    """CBAM block: channel gate, then spatial gate; keeps the input shape."""

    block_name = "cbam"

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7) -> None:
        super().__init__()
        hidden = channels // reduction if reduction > 0 else 0
        if channels < 1 or hidden < 1:
            raise ValueError(
                f"CBAM needs channels // reduction >= 1, got channels={channels}, "
                f"reduction={reduction}"
            )
        if spatial_kernel < 1 or spatial_kernel % 2 == 0:
            raise ValueError(f"CBAM spatial_kernel must be positive and odd, got {spatial_kernel}")
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )
        self.channel_gate = Tap("channel", nn.Sigmoid())
        pad = (spatial_kernel - 1) // 2
        self.spatial_conv = nn.Conv2d(2, 1, spatial_kernel, padding=pad, bias=False)
        self.spatial_bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)
        self.spatial_gate = Tap("spatial", nn.Sigmoid())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: default MLP, kaiming fan_out spatial conv, spatial BN weight 0."""
        for layer in (self.mlp[0], self.mlp[2]):
            layer.reset_parameters()
        nn.init.kaiming_normal_(self.spatial_conv.weight, mode="fan_out", nonlinearity="relu")
        self.spatial_bn.reset_parameters()
        nn.init.zeros_(self.spatial_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.stack((x.mean((2, 3)), x.amax((2, 3))))
        x = x * self.channel_gate(self.mlp(pooled).sum(0))[:, :, None, None]
        pooled = torch.cat((x.amax(1, keepdim=True), x.mean(1, keepdim=True)), dim=1)
        return x * self.spatial_gate(self.spatial_bn(self.spatial_conv(pooled)))
