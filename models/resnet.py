"""ResNet and ResNeXt with a selectable attention block (torchvision "v1.5" layout).

Deep Residual Learning for Image Recognition (He et al., arXiv 1512.03385) and Aggregated
Residual Transformations (ResNeXt, Xie et al., arXiv 1611.05431). Stride sits in the 3x3 conv;
stem is a 7x7/2 conv + max pool (configurable, see `models.small`); pooling is adaptive, so any
input size (also non-square) works.

Layout options, each matching the key names and shapes of the code that defines it:
- `stem_type="deep"` / `"deep_tiered"`: the ResNet-D / ResNet-T stems of Bag of Tricks
  (He et al., arXiv 1812.01187) as timm builds them: three 3x3 convs (widths w/2, w/2, w or
  3w/8, w/2, w for stem width w), `conv1.0/.3/.6` with BNs at `conv1.1/.4` and `bn1`.
- `avg_down=True`: the shortcut of a strided block is a 2x2 average pool (ceil mode, padding not
  counted) before the 1x1 conv (`downsample.1`, BN `downsample.2`), as timm's `downsample_avg`.
- `stem_pool="max_ceil"` and `block_layout="caffe"`: the SENet Caffe layout (hujie-frank/SENet,
  ported as timm `legacy_se*` and Cadene's pretrainedmodels): a 3x3/2 max pool without padding in
  ceil mode; the stride on the bottleneck's first 1x1 conv (ResNeXt bottlenecks keep it on the
  grouped 3x3, as the official SE-ResNeXt); basic blocks apply the ReLU after bn2 *before* the
  attention block.

Attention placement follows each block's official code:
- add-on blocks (se, eca, cbam, gc, coordatt) are the submodule `attn`, applied after the last BN
  of the residual branch (bn2 basic / bn3 bottleneck) and before the addition with the identity,
  in every block; GC only in the stages listed in `gc_stages` (default: all but the first, i.e.
  c3-c5 for a 4-stage ResNet, as in the released GCNet configs). CoordAtt has no official ResNet
  placement; putting it where SE goes is a project choice.
- "sk" replaces the 3x3 conv (bottleneck conv2; basic block conv1, the strided one) by SKConv,
  which applies BN+ReLU per branch itself, so the replaced conv's BN and ReLU are dropped;
  ResNeXt-50 (32x4d) + "sk" is SKNet-50.
- "stn" (alone or combined, "stn+cbam") puts a spatial transformer in front: on the input image
  (`stn_stage` 0, default) or on the input of stage `stn_stage`; `stn_kwargs` are its options
  (transform, output_size). The residual-block part of a combination is placed as above.
- ECA kernels per stage: the released checkpoints' (e.g. k3557 for ResNet-50) where the
  architecture defines them, else the paper's formula per channel count ("adaptive").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from models.attention import split_attention
from models.data_config import DataConfig
from models.placement import AttnFactory, ConvFactory, front_block, stage_factories


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def _attn(attn_layer: AttnFactory | None, channels: int) -> nn.Module:
    block = attn_layer(channels) if attn_layer is not None else None
    return block if block is not None else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convs; `sk_layer` (if given) replaces the first, strided one. `caffe`: ReLU after
    bn2 before the attention block (SENet's SEResNetBlock)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        attn_layer: AttnFactory | None = None,
        sk_layer: ConvFactory | None = None,
        caffe: bool = False,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        if sk_layer is None:
            self.conv1: nn.Module = _conv3x3(inplanes, planes, stride)
            self.bn1: nn.Module = nn.BatchNorm2d(planes)
            self.act1: nn.Module = nn.ReLU(inplace=True)
        else:
            self.conv1 = sk_layer(inplanes, planes, stride)
            self.bn1 = nn.Identity()
            self.act1 = nn.Identity()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act_pre_attn: nn.Module = nn.ReLU(inplace=True) if caffe else nn.Identity()
        self.attn = _attn(attn_layer, planes)
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.attn(self.act_pre_attn(self.bn2(self.conv2(out))))
        return self.act2(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt; SKConv with `sk_layer`), 1x1 expand. `caffe`: the
    stride sits on the 1x1 reduce unless the 3x3 is grouped (SENet's SEResNetBottleneck)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        attn_layer: AttnFactory | None = None,
        sk_layer: ConvFactory | None = None,
        caffe: bool = False,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        out_channels = planes * self.expansion
        stride_1x1 = stride if caffe and groups == 1 else 1
        stride = stride // stride_1x1
        self.conv1 = _conv1x1(inplanes, width, stride_1x1)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        if sk_layer is None:
            self.conv2: nn.Module = _conv3x3(width, width, stride, groups)
            self.bn2: nn.Module = nn.BatchNorm2d(width)
            self.act2: nn.Module = nn.ReLU(inplace=True)
        else:
            self.conv2 = sk_layer(width, width, stride)
            self.bn2 = nn.Identity()
            self.act2 = nn.Identity()
        self.conv3 = _conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.attn = _attn(attn_layer, out_channels)
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.attn(self.bn3(self.conv3(out)))
        return self.act3(out + shortcut)


BLOCK_TYPES: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
}


class ResNet(nn.Module):
    """ResNet/ResNeXt classifier; architecture knobs are data, the attention block a parameter.

    `eca_kernels`: None = `released_eca_kernels` if the architecture has them, else adaptive;
    "adaptive" = the ECA paper's formula per channel count; or one odd kernel size per stage.
    `gc_stages`: 1-based stage indices that get a GC block. `.arch`, `.data_config` and
    `.model_kwargs` are set by `models.registry.create_model`.
    """

    arch: str
    data_config: DataConfig
    model_kwargs: dict[str, Any]

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        strides: Sequence[int] | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        stem_width: int = 64,
        stem_kernel: int = 7,
        stem_type: str = "",
        stem_pool: str = "max",
        avg_down: bool = False,
        block_layout: str = "torchvision",
        attention: str = "none",
        attn_kwargs: dict[str, Any] | None = None,
        gc_stages: Sequence[int] | None = None,
        eca_kernels: str | Sequence[int] | None = None,
        released_eca_kernels: Sequence[int] | None = None,
        stn_stage: int = 0,
        stn_kwargs: dict[str, Any] | None = None,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        strides = _check_layout(block, layers, widths, strides, drop_rate)
        _check_choice("stem_type", stem_type, STEM_TYPES)
        _check_choice("stem_pool", stem_pool, tuple(STEM_POOLS))
        _check_choice("block_layout", block_layout, BLOCK_LAYOUTS)
        residual = split_attention(attention)[1]
        factories = stage_factories(
            residual, len(layers), attn_kwargs or {}, gc_stages, eca_kernels, released_eca_kernels
        )
        expansion = BLOCK_TYPES[block].expansion
        channels = [in_chans, stem_width, *(w * expansion for w in widths[:-1])]
        self.stn = front_block(attention, channels, stn_stage, stn_kwargs)
        self.stn_stage = stn_stage
        self.num_classes, self.in_chans, self.attention = num_classes, in_chans, attention
        self.groups, self.base_width = groups, width_per_group
        self.avg_down, self.caffe = avg_down, block_layout == "caffe"
        self.conv1 = _stem_conv(in_chans, stem_width, stem_kernel, stem_type)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = STEM_POOLS[stem_pool]()
        self.inplanes = stem_width
        for i, (planes, depth, stride) in enumerate(zip(widths, layers, strides, strict=True)):
            stage = self._make_layer(BLOCK_TYPES[block], planes, depth, stride, *factories[i])
            self.add_module(f"layer{i + 1}", stage)
        self.num_stages = len(layers)
        self.num_features = self.inplanes
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)
        _init_weights(self)

    def _make_layer(
        self,
        block_cls: type[BasicBlock] | type[Bottleneck],
        planes: int,
        depth: int,
        stride: int,
        attn_layer: AttnFactory | None,
        sk_layer: ConvFactory | None,
    ) -> nn.Sequential:
        out_channels = planes * block_cls.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            downsample = _downsample(self.inplanes, out_channels, stride, self.avg_down)
        blocks = []
        for i in range(depth):
            blocks.append(
                block_cls(
                    self.inplanes,
                    planes,
                    stride if i == 0 else 1,
                    downsample if i == 0 else None,
                    groups=self.groups,
                    base_width=self.base_width,
                    attn_layer=attn_layer,
                    sk_layer=sk_layer,
                    caffe=self.caffe,
                )
            )
            self.inplanes = out_channels
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Front transformer, stem and all stages: the final feature map (N, num_features, h, w)."""
        if self.stn is not None and self.stn_stage == 0:
            x = self.stn(x)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            if self.stn is not None and self.stn_stage == i + 1:
                x = self.stn(x)
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool, dropout, linear classifier."""
        return self.fc(self.drop(torch.flatten(self.global_pool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


STEM_TYPES: tuple[str, ...] = ("", "deep", "deep_tiered")
BLOCK_LAYOUTS: tuple[str, ...] = ("torchvision", "caffe")
STEM_POOLS: dict[str, Callable[[], nn.Module]] = {
    "max": lambda: nn.MaxPool2d(3, 2, padding=1),
    "max_ceil": lambda: nn.MaxPool2d(3, 2, ceil_mode=True),
    "none": nn.Identity,
}
"""Stem pools: torchvision's padded 3x3/2 max pool, the Caffe SENet's unpadded ceil-mode one."""


def _stem_conv(in_chans: int, width: int, kernel: int, stem_type: str) -> nn.Module:
    """One kxk/2 conv, or the three 3x3 convs of a deep (ResNet-D) or tiered (ResNet-T) stem."""
    if not stem_type:
        return nn.Conv2d(in_chans, width, kernel, stride=2, padding=kernel // 2, bias=False)
    inner = width // 2
    first = 3 * (inner // 4) if stem_type == "deep_tiered" else inner
    return nn.Sequential(
        _conv3x3(in_chans, first, stride=2),
        nn.BatchNorm2d(first),
        nn.ReLU(inplace=True),
        _conv3x3(first, inner),
        nn.BatchNorm2d(inner),
        nn.ReLU(inplace=True),
        _conv3x3(inner, width),
    )


def _downsample(cin: int, cout: int, stride: int, avg_down: bool) -> nn.Sequential:
    """The projection shortcut: a strided 1x1 conv + BN, or (avg_down) a 2x2 average pool, then a
    1x1 conv + BN."""
    if not avg_down:
        return nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
    pool: nn.Module = nn.Identity()
    if stride != 1:
        pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(pool, _conv1x1(cin, cout), nn.BatchNorm2d(cout))


def _check_choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {list(valid)}")


def _check_layout(
    block: str,
    layers: Sequence[int],
    widths: Sequence[int],
    strides: Sequence[int] | None,
    drop_rate: float,
) -> tuple[int, ...]:
    """Validate the stage layout; returns the strides (default 1 then 2 for every later stage)."""
    if block not in BLOCK_TYPES:
        raise ValueError(f"unknown block type {block!r}; valid: {sorted(BLOCK_TYPES)}")
    strides = tuple(strides) if strides is not None else (1,) + (2,) * (len(layers) - 1)
    if not len(widths) == len(strides) == len(layers):
        raise ValueError(
            f"widths {tuple(widths)}, strides {strides} and depths {tuple(layers)} differ in length"
        )
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, int | float):
        raise ValueError(f"drop_rate must be a number in [0, 1), got {drop_rate!r}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    return strides


def _init_weights(module: nn.Module) -> None:
    """Kaiming fan_out convs and unit BNs (as torchvision), skipping attention blocks' subtrees
    so their own special inits (CBAM spatial BN = 0, GC last conv = 0) survive."""
    if getattr(module, "block_name", None) is not None:
        return
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    for child in module.children():
        _init_weights(child)
