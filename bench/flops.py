"""FLOPs of one forward pass with attention capture on, counted once per architecture.

The counter is torch's `torch.utils.flop_counter.FlopCounterMode`: it counts the matrix ops
(convolution, linear/addmm, mm, bmm, einsum lowered to bmm, scaled dot-product attention) at 2
FLOPs per multiply-add, the usual convention behind "4.1 GFLOPs" for ResNet-50 (which is 4.1 G
multiply-adds, so 8.2 GFLOPs here). The forward runs under `capture_attention(derived=True)`,
so the attention blocks' own convolutions and linear layers (attributed to the block's module
path) and the capture's derived views (the difference to a forward without capture) are in the
total. Elementwise ops, pooling and normalisation
are not FLOPs in that convention; `other_elements` sums the output sizes of every other op so
their share can be seen (a few percent of the matrix FLOPs, and memory-bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from models import capture_attention
from models.attention.capture import iter_blocks

__all__ = ["FlopCount", "count_flops"]


@dataclass(frozen=True)
class FlopCount:
    """Per image: matrix FLOPs in all, those inside attention blocks, those the capture adds
    (derived views), and the output elements of every other op."""

    total: int
    attention: int
    capture: int
    other_elements: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "gflops_per_image": round(self.total / 1e9, 4),
            "attention_gflops_per_image": round(self.attention / 1e9, 5),
            "attention_share": round(self.attention / self.total, 5) if self.total else 0.0,
            "capture_gflops_per_image": round(self.capture / 1e9, 5),
            "other_gelements_per_image": round(self.other_elements / 1e9, 4),
        }


class _OtherElements(TorchDispatchMode):
    """Sums the output elements of every op that FlopCounterMode does not count."""

    def __init__(self, counted: set[Any]) -> None:
        super().__init__()
        self.counted = counted
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket not in self.counted:
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    self.elements += tensor.numel()
        return out


def count_flops(model: nn.Module, input_size: tuple[int, ...]) -> FlopCount:
    """Count one image's forward of `model` (eval mode, on the CPU) with capture on."""
    x = torch.zeros((1, *input_size))
    plain = FlopCounterMode(display=False)
    with torch.inference_mode(), plain:
        model(x)
    counter = FlopCounterMode(display=False)
    other = _OtherElements(set(counter.flop_registry))
    with torch.inference_mode(), counter, other, capture_attention(model, derived=True):
        model(x)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    attention = 0
    for site, _ in iter_blocks(model):
        attention += sum(counts.get(f"{root}.{site}", {}).values())
    total = counter.get_total_flops()
    return FlopCount(total, attention, total - plain.get_total_flops(), other.elements)
