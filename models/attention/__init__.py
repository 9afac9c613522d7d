"""Attention blocks (one paper per file), the attention capture, the table of record kinds and
the summary map.

Add-on blocks take ``(channels, **options)`` and keep the input shape; SK replaces a 3x3 conv.
Every block has a ``block_name`` class attribute and a ``reset_parameters()`` method that applies
the official initialisation (call it again after any model-wide re-initialisation).
"""

from __future__ import annotations

from torch import nn

from .capture import (
    DERIVED_VIEWS,
    AttentionCapture,
    AttentionRecord,
    SiteInfo,
    Tap,
    capture_attention,
    iter_blocks,
    list_sites,
)
from .cbam import CBAM
from .coord_att import CoordAtt
from .eca import ECA, eca_kernel_size
from .gc import GC
from .kinds import RECORD_KINDS, SPATIAL_KINDS, RecordKind, display
from .se import SE
from .sk import SKConv
from .summary import spatial_views, summary_map

ATTENTION_BLOCKS = ("none", "se", "eca", "cbam", "gc", "coordatt", "sk")

_ADD_ON_BLOCKS: dict[str, type[nn.Module]] = {
    "se": SE,
    "eca": ECA,
    "cbam": CBAM,
    "gc": GC,
    "coordatt": CoordAtt,
}


def create_attention(name: str, channels: int, **kwargs: object) -> nn.Module | None:
    """Build the add-on block ``name`` for ``channels`` channels; ``None`` for ``"none"``."""
    if name == "none":
        return None
    if name == "sk":
        raise ValueError(
            "'sk' is not an add-on block: it replaces the 3x3 convolution of a bottleneck. "
            "Hint: build SKConv(in_channels, out_channels, stride) in place of that conv."
        )
    if name not in _ADD_ON_BLOCKS:
        raise ValueError(f"unknown attention block {name!r}; valid: {', '.join(ATTENTION_BLOCKS)}")
    return _ADD_ON_BLOCKS[name](channels, **kwargs)


__all__ = [
    "ATTENTION_BLOCKS",
    "CBAM",
    "DERIVED_VIEWS",
    "ECA",
    "GC",
    "RECORD_KINDS",
    "SE",
    "SPATIAL_KINDS",
    "AttentionCapture",
    "AttentionRecord",
    "CoordAtt",
    "RecordKind",
    "SKConv",
    "SiteInfo",
    "Tap",
    "capture_attention",
    "create_attention",
    "display",
    "eca_kernel_size",
    "iter_blocks",
    "list_sites",
    "spatial_views",
    "summary_map",
]
