"""Where attention goes in a ResNet: per-stage block factories from the attention options.

Add-on blocks are built by `create_attention` for the residual branch's output channels; "sk"
yields a factory for the SKConv that replaces the 3x3 conv. `gc_stages` and `eca_kernels` pick
the stages with a GC block and the ECA kernel size per stage (see `models.resnet`). A front block
("stn", alone or as in "stn+cbam") is built by `front_block` for the input of stage `stn_stage`
(0: the input image, as in the paper's cluttered-digit models).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from torch import nn

from models.attention import ATTENTION_BLOCKS, create_attention, split_attention
from models.attention.sk import SKConv

AttnFactory = Callable[[int], nn.Module | None]
"""channels -> add-on attention block (None: no block)."""
ConvFactory = Callable[[int, int, int], nn.Module]
"""(in_channels, out_channels, stride) -> a module replacing the 3x3 conv (SKConv)."""


def stage_factories(
    attention: str,
    num_stages: int,
    attn_kwargs: dict[str, Any],
    gc_stages: Sequence[int] | None,
    eca_kernels: str | Sequence[int] | None,
    released_eca_kernels: Sequence[int] | None,
) -> list[tuple[AttnFactory | None, ConvFactory | None]]:
    """Per stage: (add-on attention factory, SK conv factory); validates the attention options."""
    if attention not in ATTENTION_BLOCKS:
        raise ValueError(f"unknown attention block {attention!r}; valid: {list(ATTENTION_BLOCKS)}")
    if gc_stages is not None and attention != "gc":
        raise ValueError(f"gc_stages applies only to attention='gc', not {attention!r}")
    if eca_kernels is not None and attention != "eca":
        raise ValueError(f"eca_kernels applies only to attention='eca', not {attention!r}")
    if attention == "none":
        if attn_kwargs:
            raise ValueError("attn_kwargs given but attention='none'")
        return [(None, None)] * num_stages
    if attention == "sk":
        return [(None, partial(SKConv, **attn_kwargs))] * num_stages
    per_stage: list[dict[str, Any]] = [{} for _ in range(num_stages)]
    enabled = [True] * num_stages
    if attention == "gc":
        chosen = _check_stages(gc_stages, num_stages)
        enabled = [i + 1 in chosen for i in range(num_stages)]
    elif attention == "eca":
        if "kernel_size" in attn_kwargs:
            raise ValueError("set ECA kernels with eca_kernels, not attn_kwargs['kernel_size']")
        kernels = _eca_kernels(eca_kernels, released_eca_kernels, num_stages)
        per_stage = [{"kernel_size": k} for k in kernels]
    return [
        (partial(create_attention, attention, **attn_kwargs, **extra) if on else None, None)
        for on, extra in zip(enabled, per_stage, strict=True)
    ]


def _check_stages(stages: Sequence[int] | None, num_stages: int) -> tuple[int, ...]:
    """GC stages as 1-based layer indices (layer1 = c2); default all but the first."""
    if stages is None:
        return tuple(range(2, num_stages + 1))
    valid = range(1, num_stages + 1)
    if isinstance(stages, str) or not all(isinstance(s, int) and s in valid for s in stages):
        raise ValueError(f"gc_stages must be layer indices in {list(valid)}, got {stages!r}")
    return tuple(sorted(set(stages)))


def _eca_kernels(
    value: str | Sequence[int] | None, released: Sequence[int] | None, num_stages: int
) -> list[int | None]:
    """Resolve the per-stage ECA kernel sizes; None entries mean the paper's adaptive formula."""
    if value is None:
        value = released if released is not None else "adaptive"
    if value == "adaptive":
        return [None] * num_stages
    if isinstance(value, str) or len(value) != num_stages:
        raise ValueError(
            f"eca_kernels must be 'adaptive' or {num_stages} odd positive ints, got {value!r}"
        )
    if not all(isinstance(k, int) and k > 0 and k % 2 == 1 for k in value):
        raise ValueError(f"eca_kernels must be odd positive ints, got {value!r}")
    return list(value)


def front_block(
    attention: str,
    stage_channels: Sequence[int],
    stn_stage: int,
    stn_kwargs: dict[str, Any] | None,
) -> nn.Module | None:
    """The spatial transformer in front of stage `stn_stage` (0 = on the input image, i >= 1 =
    on the input of stage i), or None when `attention` has no front block.

    `stage_channels`: channels at each place (input, then the input of every stage)."""
    front, _ = split_attention(attention)
    if front is None:
        if stn_kwargs is not None or stn_stage != 0:
            raise ValueError(
                f"stn_stage and stn_kwargs apply only to 'stn' blocks, not {attention!r}"
            )
        return None
    valid = range(len(stage_channels))
    if isinstance(stn_stage, bool) or not isinstance(stn_stage, int) or stn_stage not in valid:
        raise ValueError(f"stn_stage must be one of {list(valid)}, got {stn_stage!r}")
    return create_attention(front, stage_channels[stn_stage], **(stn_kwargs or {}))
