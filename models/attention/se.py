"""Squeeze-and-Excitation Networks (Hu, Shen, Sun; CVPR 2018), arXiv:1709.01507.

Follows the official Caffe model (hujie-frank/SENet ``SE-ResNet-50.prototxt``): GAP, an FC
C -> C//r, ReLU, an FC C//r -> C, sigmoid, channel-wise scaling; r = 16. The FCs are 1x1
convolutions *with* bias, as in Caffe (``bias_term`` defaults to true) and timm's port of the
official weights (``fc1``/``fc2``, same key names).

What common versions get wrong, and where this one differs:
- ``bias=False`` FCs (moskomule/senet.pytorch, many blogs) deviate from the official code and
  drop C + C//r parameters per block.
- timm's generic ``SEModule`` rounds the hidden width to a multiple of 8; here it is C // r.
- A circulated blog hard-codes ``C / 4`` in the second FC, which crashes for any r != 4.
Params: 2C^2/r + C/r + C.
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import Tap


class SE(nn.Module):
    """SE block: ``x * sigmoid(fc2(relu(fc1(GAP(x)))))``; keeps the input shape."""

    block_name = "se"

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction if reduction > 0 else 0
        if channels < 1 or hidden < 1:
            raise ValueError(
                f"SE needs channels // reduction >= 1, got channels={channels}, "
                f"reduction={reduction}"
            )
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True)
        self.gate = Tap("channel", nn.Sigmoid())

    def reset_parameters(self) -> None:
        """PyTorch default init of both FCs (the official Caffe model trains from msra fillers)."""
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))
