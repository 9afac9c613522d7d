"""Model registry: every architecture is one line of data; `create_model` builds any of them with
any attention block and attaches `.arch`, `.attention`, `.data_config` and `.model_kwargs`."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, NamedTuple

from models.attention import ATTENTION_BLOCKS
from models.data_config import DataConfig, imagenet_data_config
from models.mobilenet import MobileNetV2
from models.resnet import ResNet
from models.small import resnet_small, small_data_config

_RESNET_OPTIONS = (
    "attn_kwargs",
    "drop_rate",
    "eca_kernels",
    "gc_stages",
    "stn_kwargs",
    "stn_stage",
)


class ArchSpec(NamedTuple):
    """How to build one architecture: builder, its fixed data, the user options it accepts,
    default class count / input channels and the default data config."""

    builder: Callable[..., ResNet | MobileNetV2]
    params: dict[str, Any]
    options: tuple[str, ...]
    num_classes: int
    in_chans: int
    data_config: Callable[[int, int], DataConfig]


def _imagenet(
    block: str, layers: tuple[int, ...], eca: tuple[int, ...] | None = None, **params: Any
) -> ArchSpec:
    """A torchvision-layout ImageNet ResNet; `eca` = the released ECA checkpoints' kernels."""
    params = {"block": block, "layers": layers, "released_eca_kernels": eca, **params}
    return ArchSpec(ResNet, params, _RESNET_OPTIONS, 1000, 3, imagenet_data_config)


def _caffe(block: str, layers: tuple[int, ...], **params: Any) -> ArchSpec:
    """An ImageNet ResNet in the SENet Caffe layout (see `models.resnet`)."""
    return _imagenet(block, layers, stem_pool="max_ceil", block_layout="caffe", **params)


_ARCHS: dict[str, ArchSpec] = {
    "resnet18": _imagenet("basic", (2, 2, 2, 2), eca=(3, 5, 7, 7)),
    "resnet34": _imagenet("basic", (3, 4, 6, 3), eca=(3, 3, 5, 7)),
    "resnet50": _imagenet("bottleneck", (3, 4, 6, 3), eca=(3, 5, 5, 7)),
    "resnet101": _imagenet("bottleneck", (3, 4, 23, 3), eca=(3, 3, 5, 7)),
    "resnext50_32x4d": _imagenet("bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4),
    "resnet152": _imagenet("bottleneck", (3, 8, 36, 3)),
    # ResNet-D / ResNet-T (timm resnet50d ... ; with "eca": ecaresnet50d, ...; adaptive ECA).
    "resnet26t": _imagenet("bottleneck", (2, 2, 2, 2), stem_type="deep_tiered", avg_down=True),
    "resnet50d": _imagenet("bottleneck", (3, 4, 6, 3), stem_type="deep", avg_down=True),
    "resnet50t": _imagenet("bottleneck", (3, 4, 6, 3), stem_type="deep_tiered", avg_down=True),
    "resnet101d": _imagenet("bottleneck", (3, 4, 23, 3), stem_type="deep", avg_down=True),
    # The SENet Caffe layout (with "se": timm legacy_seresnet18 ..., the official SENets).
    "legacy_resnet18": _caffe("basic", (2, 2, 2, 2)),
    "legacy_resnet34": _caffe("basic", (3, 4, 6, 3)),
    "legacy_resnet50": _caffe("bottleneck", (3, 4, 6, 3)),
    "legacy_resnet101": _caffe("bottleneck", (3, 4, 23, 3)),
    "legacy_resnet152": _caffe("bottleneck", (3, 8, 36, 3)),
    "legacy_resnext50_32x4d": _caffe("bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4),
    # With "coordatt": the official MobileNetV2 + Coordinate Attention (mbv2_ca).
    "mobilenetv2": ArchSpec(
        MobileNetV2, {}, ("attn_kwargs", "drop_rate", "stn_kwargs"), 1000, 3, imagenet_data_config
    ),
    "resnet_small": ArchSpec(
        resnet_small, {}, (*_RESNET_OPTIONS, "depths", "widths"), 10, 1, small_data_config
    ),
}


def list_models() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_ARCHS)


def get_arch_spec(arch: str) -> ArchSpec:
    """The registry line of `arch`; ValueError listing the valid names if unknown."""
    try:
        return _ARCHS[arch]
    except (KeyError, TypeError):
        raise ValueError(f"unknown architecture {arch!r}; valid: {list_models()}") from None


def create_model(
    arch: str,
    attention: str = "none",
    num_classes: int | None = None,
    in_chans: int | None = None,
    *,
    data_config: DataConfig | Mapping[str, Any] | None = None,
    labels: list[str] | tuple[str, ...] | None = None,
    **kwargs: Any,
) -> ResNet | MobileNetV2:
    """Build `arch` with the `attention` block (randomly initialised).

    `num_classes` / `in_chans` default to the architecture's (1000 / 3 for the ImageNet archs,
    10 / 1 for resnet_small). `kwargs` are architecture options (see `ArchSpec.options`); they are
    kept, JSON-normalised, as `model.model_kwargs` so a model card can rebuild the same network.
    `data_config` / `labels` override the default data config.
    """
    spec = get_arch_spec(arch)
    if attention not in ATTENTION_BLOCKS:
        raise ValueError(f"unknown attention block {attention!r}; valid: {list(ATTENTION_BLOCKS)}")
    num_classes = _positive_int("num_classes", _default(num_classes, spec.num_classes))
    in_chans = _positive_int("in_chans", _default(in_chans, spec.in_chans))
    unknown = sorted(set(kwargs) - set(spec.options))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for architecture {arch!r}; valid: {sorted(spec.options)}"
        )
    model_kwargs = _json_normalised(kwargs)
    config = _resolve_data_config(spec, in_chans, num_classes, data_config, labels)
    model = spec.builder(
        num_classes=num_classes, in_chans=in_chans, attention=attention, **spec.params, **kwargs
    )
    model.arch = arch
    model.attention = attention
    model.model_kwargs = model_kwargs
    model.data_config = config
    return model


def _resolve_data_config(
    spec: ArchSpec,
    in_chans: int,
    num_classes: int,
    data_config: DataConfig | Mapping[str, Any] | None,
    labels: list[str] | tuple[str, ...] | None,
) -> DataConfig:
    """The default data config with the overrides applied, checked against the model's shape."""
    if data_config is None:
        config = spec.data_config(in_chans, num_classes)
    elif isinstance(data_config, DataConfig):
        config = data_config
    else:
        config = DataConfig.from_dict(data_config)
    if config.channels != in_chans:
        raise ValueError(
            f"data_config has {config.channels} input channels but the model takes {in_chans}"
        )
    if isinstance(labels, str):
        raise ValueError(f"labels must be a list of strings, got the string {labels!r}")
    if labels is not None:
        config = replace(config, labels=tuple(labels))
    elif not config.labels:
        config = replace(config, labels=spec.data_config(in_chans, num_classes).labels)
    if len(config.labels) != num_classes:
        raise ValueError(f"got {len(config.labels)} labels for a model with {num_classes} classes")
    return config


def _default(value: Any, default: int) -> Any:
    return default if value is None else value


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _json_normalised(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options as read back from JSON (tuples become lists); ValueError if not JSON-able."""
    try:
        return json.loads(json.dumps(kwargs, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model options must be JSON-serialisable: {exc}") from None


__all__ = ["ArchSpec", "create_model", "get_arch_spec", "list_models"]
