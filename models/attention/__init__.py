"""Attention blocks (one paper per file), the attention capture, the table of record kinds and
the summary map.

Add-on blocks take ``(channels, **options)`` and keep the input shape; SK replaces a 3x3 conv;
the spatial transformer (STN) sits in front of the classifier or of a later stage.
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
from .stn import SpatialTransformer
from .summary import spatial_views, summary_map

RESIDUAL_BLOCKS = ("se", "eca", "cbam", "gc", "coordatt", "sk")
"""Blocks that sit in every residual block (add-ons, or SK in place of the 3x3 conv)."""
FRONT_BLOCKS = ("stn",)
"""Blocks in front of the classifier (or of a later stage): the spatial transformer."""
ATTENTION_BLOCKS = (
    "none",
    *RESIDUAL_BLOCKS,
    *FRONT_BLOCKS,
    *(f"{front}+{block}" for front in FRONT_BLOCKS for block in RESIDUAL_BLOCKS),
)
"""Every block name the models take: each block alone, and a front transformer combined with
each residual-block attention ("stn+cbam": a transformer in front, CBAM in every block)."""
SINGLE_BLOCKS = ("none", *RESIDUAL_BLOCKS, *FRONT_BLOCKS)
"""Every block on its own, without the combinations (one digits-<block> zoo model each)."""


def split_attention(name: str) -> tuple[str | None, str]:
    """("stn", "cbam") for "stn+cbam", ("stn", "none") for "stn", (None, "se") for "se"."""
    if name not in ATTENTION_BLOCKS:
        raise ValueError(f"unknown attention block {name!r}; valid: {list(ATTENTION_BLOCKS)}")
    if name in FRONT_BLOCKS:
        return name, "none"
    front, _, block = name.rpartition("+")
    return front or None, block


_ADD_ON_BLOCKS: dict[str, type[nn.Module]] = {
    "se": SE,
    "eca": ECA,
    "cbam": CBAM,
    "gc": GC,
    "coordatt": CoordAtt,
}


def create_attention(name: str, channels: int, **kwargs: object) -> nn.Module | None:
    """Build the add-on block ``name`` (or the spatial transformer "stn") for ``channels``
    channels; ``None`` for ``"none"``."""
    if name == "none":
        return None
    if name == "stn":
        return SpatialTransformer(channels, **kwargs)  # type: ignore[arg-type]
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
    "FRONT_BLOCKS",
    "GC",
    "RECORD_KINDS",
    "RESIDUAL_BLOCKS",
    "SE",
    "SINGLE_BLOCKS",
    "SPATIAL_KINDS",
    "AttentionCapture",
    "AttentionRecord",
    "CoordAtt",
    "RecordKind",
    "SKConv",
    "SiteInfo",
    "SpatialTransformer",
    "Tap",
    "capture_attention",
    "create_attention",
    "display",
    "eca_kernel_size",
    "iter_blocks",
    "list_sites",
    "spatial_views",
    "split_attention",
    "summary_map",
]
