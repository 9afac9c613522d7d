"""ECA-Net: Efficient Channel Attention (Wang et al.; CVPR 2020), arXiv:1910.03151.

Follows the official module (BangguWu/ECANet ``models/eca_module.py``): GAP, a 1-D convolution of
size k across channels (1 -> 1 channel, zero padding (k-1)//2, no bias), sigmoid, scaling.

Kernel size: ``kernel_size=None`` takes k from the paper's Fig. 3 rule (:func:`eca_kernel_size`,
giving 64:3, 128:5, 256:5, 512:5, 1024:5, 2048:7). The official module ignores ``channel`` and
uses an explicit k (code default 3 everywhere); the released checkpoints use per-stage k (ECA-Net50
``k3557``, which is the paper's 80 parameters), so callers pass ``kernel_size`` for that mode.

Deviations in common versions: bias on the Conv1d and a fixed k = 3 (External-Attention-pytorch);
circular padding (timm ``CecaModule``); timm clamps k to >= 3, this module does not (the formula
can give k = 1 for tiny C, i.e. no cross-channel interaction, as the official MobileNetV2 uses).
Params: k.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .capture import Tap


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """Paper rule k = |(log2(C) + b) / gamma|_odd: truncate, then bump an even value by one."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(nn.Module):
    """ECA block: ``x * sigmoid(conv1d_k(GAP(x)))``; keeps the input shape."""

    block_name = "eca"

    def __init__(
        self, channels: int, kernel_size: int | None = None, gamma: float = 2, b: float = 1
    ) -> None:
        super().__init__()
        k = eca_kernel_size(channels, gamma, b) if kernel_size is None else kernel_size
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"ECA kernel_size must be a positive odd int, got {k!r}")
        self.kernel_size = k
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)
        self.gate = Tap("channel", nn.Sigmoid())

    def reset_parameters(self) -> None:
        """PyTorch default init of the 1-D kernel (as the official code)."""
        self.conv.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        y = self.gate(self.conv(x.mean((2, 3)).unsqueeze(1)))
        return x * y.reshape(n, c, 1, 1)
