"""Checkpoint fixtures in the exact key names, shapes and wrapping of the supported sources.

timm and torchvision do not import on this CPU build, so each source's state dict is generated
from its documented layout: the key lists below are written from the reference code (timm
``resnet.py``, ``senet.py``, ``sknet.py``, torchvision ``resnet.py``, BangguWu/ECANet
``eca_resnet.py``, Jongchan/attention-module ``model_resnet.py``/``cbam.py``, houqb/CoordAttention
``mbv2_ca.py``), not from the project's modules, so a wrong name or shape on either side fails
the import. Values are random but tame (BN statistics near identity) so logits stay finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

Shapes = dict[str, tuple[int, ...]]
PLANES = (64, 128, 256, 512)


def _bn(prefix: str, c: int, counters: bool = True) -> Shapes:
    keys = {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")}
    if counters:
        keys[f"{prefix}.num_batches_tracked"] = ()
    return keys


def _make_divisible(v: float, divisor: int) -> int:
    """timm's make_divisible (round_limit 0.9)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _timm_eca_kernel(c: int) -> int:
    t = int(abs(math.log(c, 2) + 1) / 2)
    return max(t if t % 2 else t + 1, 3)


def resnet_keys(
    block: str,
    layers: tuple[int, ...],
    *,
    groups: int = 1,
    base_width: int = 64,
    stem: str = "",
    avg_down: bool = False,
    attn: str | None = None,
    attn_name: str = "se",
    eca_kernels: tuple[int, ...] | None = None,
    num_classes: int = 1000,
    counters: bool = True,
    sk: bool = False,
) -> Shapes:
    """torchvision / timm ``ResNet`` keys (timm's block attribute ``se``; ECA-Net's ``eca``;
    CBAM's ``cbam``); ``sk``: timm's SelectiveKernelBottleneck."""
    keys: Shapes = {}
    if stem:
        c0, c1 = (24, 32) if stem == "deep_tiered" else (32, 32)
        keys["conv1.0.weight"] = (c0, 3, 3, 3)
        keys.update(_bn("conv1.1", c0, counters))
        keys["conv1.3.weight"] = (c1, c0, 3, 3)
        keys.update(_bn("conv1.4", c1, counters))
        keys["conv1.6.weight"] = (64, c1, 3, 3)
    else:
        keys["conv1.weight"] = (64, 3, 7, 7)
    keys.update(_bn("bn1", 64, counters))
    inplanes = 64
    expansion = 4 if block == "bottleneck" else 1
    for stage, (planes, depth) in enumerate(zip(PLANES, layers, strict=True)):
        out = planes * expansion
        for j in range(depth):
            p = f"layer{stage + 1}.{j}"
            if block == "basic":
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                keys.update(_bn(f"{p}.bn1", planes, counters))
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                keys.update(_bn(f"{p}.bn2", planes, counters))
            elif sk:
                width = planes * base_width // 64 * groups
                rd = _make_divisible(width / 16, 32)
                keys[f"{p}.conv1.conv.weight"] = (width, inplanes, 1, 1)
                keys.update(_bn(f"{p}.conv1.bn", width, counters))
                for m in range(2):
                    keys[f"{p}.conv2.paths.{m}.conv.weight"] = (width, width // groups, 3, 3)
                    keys.update(_bn(f"{p}.conv2.paths.{m}.bn", width, counters))
                keys[f"{p}.conv2.attn.fc_reduce.weight"] = (rd, width, 1, 1)
                keys.update(_bn(f"{p}.conv2.attn.bn", rd, counters))
                keys[f"{p}.conv2.attn.fc_select.weight"] = (2 * width, rd, 1, 1)
                keys[f"{p}.conv3.conv.weight"] = (out, width, 1, 1)
                keys.update(_bn(f"{p}.conv3.bn", out, counters))
            else:
                width = planes * base_width // 64 * groups
                keys[f"{p}.conv1.weight"] = (width, inplanes, 1, 1)
                keys.update(_bn(f"{p}.bn1", width, counters))
                keys[f"{p}.conv2.weight"] = (width, width // groups, 3, 3)
                keys.update(_bn(f"{p}.bn2", width, counters))
                keys[f"{p}.conv3.weight"] = (out, width, 1, 1)
                keys.update(_bn(f"{p}.bn3", out, counters))
            keys.update(_attn_keys(f"{p}.{attn_name}", attn, out, stage, eca_kernels, counters))
            if j == 0 and (stage > 0 or inplanes != out):
                i = 1 if avg_down else 0  # timm downsample_avg: (pool or Identity, conv, bn)
                keys[f"{p}.downsample.{i}.weight"] = (out, inplanes, 1, 1)
                keys.update(_bn(f"{p}.downsample.{i + 1}", out, counters))
            inplanes = out
    keys["fc.weight"] = (num_classes, inplanes)
    keys["fc.bias"] = (num_classes,)
    return keys


def _attn_keys(
    p: str,
    attn: str | None,
    c: int,
    stage: int,
    eca_kernels: tuple[int, ...] | None,
    counters: bool,
) -> Shapes:
    if attn is None:
        return {}
    if attn == "se":  # timm SEModule (rd multiple of 8) and the Caffe SEModule agree for C >= 128
        rd = c // 16
        return {
            f"{p}.fc1.weight": (rd, c, 1, 1),
            f"{p}.fc1.bias": (rd,),
            f"{p}.fc2.weight": (c, rd, 1, 1),
            f"{p}.fc2.bias": (c,),
        }
    if attn == "eca":
        k = eca_kernels[stage] if eca_kernels else _timm_eca_kernel(c)
        return {f"{p}.conv.weight": (1, 1, k)}
    if attn == "cbam":
        rd = c // 16
        return {
            f"{p}.ChannelGate.mlp.1.weight": (rd, c),
            f"{p}.ChannelGate.mlp.1.bias": (rd,),
            f"{p}.ChannelGate.mlp.3.weight": (c, rd),
            f"{p}.ChannelGate.mlp.3.bias": (c,),
            f"{p}.SpatialGate.spatial.conv.weight": (1, 2, 7, 7),
            **_bn(f"{p}.SpatialGate.spatial.bn", 1, counters),
        }
    raise ValueError(attn)


def senet_keys(
    block: str, layers: tuple[int, ...], *, groups: int = 1, counters: bool = True
) -> Shapes:
    """timm ``legacy_se*`` / Cadene pretrainedmodels ``SENet`` keys (SE-ResNet, SE-ResNeXt)."""
    keys: Shapes = {"layer0.conv1.weight": (64, 3, 7, 7), **_bn("layer0.bn1", 64, counters)}
    inplanes = 64
    expansion = 4 if block == "bottleneck" else 1
    for stage, (planes, depth) in enumerate(zip(PLANES, layers, strict=True)):
        out = planes * expansion
        for j in range(depth):
            p = f"layer{stage + 1}.{j}"
            if block == "basic":
                shapes = [(planes, inplanes, 3, 3), (planes, planes, 3, 3)]
            else:
                width = planes * 4 // 64 * groups if groups > 1 else planes
                shapes = [
                    (width, inplanes, 1, 1),
                    (width, width // groups, 3, 3),
                    (out, width, 1, 1),
                ]
            for i, shape in enumerate(shapes, start=1):
                keys[f"{p}.conv{i}.weight"] = shape
                keys.update(_bn(f"{p}.bn{i}", shape[0], counters))
            rd = out // 16
            keys[f"{p}.se_module.fc1.weight"] = (rd, out, 1, 1)
            keys[f"{p}.se_module.fc1.bias"] = (rd,)
            keys[f"{p}.se_module.fc2.weight"] = (out, rd, 1, 1)
            keys[f"{p}.se_module.fc2.bias"] = (out,)
            if j == 0 and (stage > 0 or inplanes != out):
                keys[f"{p}.downsample.0.weight"] = (out, inplanes, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", out, counters))
            inplanes = out
    keys["last_linear.weight"] = (1000, inplanes)
    keys["last_linear.bias"] = (1000,)
    return keys


MBV2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def mbv2_ca_keys() -> Shapes:
    """houqb/CoordAttention ``MBV2_CA`` keys (width 1.0)."""
    keys: Shapes = {"features.0.0.weight": (32, 3, 3, 3), **_bn("features.0.1", 32)}
    inp, index = 32, 1
    for t, c, n, _ in MBV2_STAGES:
        for _ in range(n):
            p, hidden = f"features.{index}.conv", inp * t
            if t == 1:
                keys[f"{p}.0.weight"] = (hidden, 1, 3, 3)
                keys.update(_bn(f"{p}.1", hidden))
                keys[f"{p}.3.weight"] = (c, hidden, 1, 1)
                keys.update(_bn(f"{p}.4", c))
            else:
                mip = max(8, hidden // 32)
                keys[f"{p}.0.weight"] = (hidden, inp, 1, 1)
                keys.update(_bn(f"{p}.1", hidden))
                keys[f"{p}.3.weight"] = (hidden, 1, 3, 3)
                keys.update(_bn(f"{p}.4", hidden))
                keys[f"{p}.6.conv1.weight"] = (mip, hidden, 1, 1)
                keys[f"{p}.6.conv1.bias"] = (mip,)
                keys.update(_bn(f"{p}.6.bn1", mip))
                for conv in ("conv2", "conv3"):
                    keys[f"{p}.6.{conv}.weight"] = (hidden, mip, 1, 1)
                    keys[f"{p}.6.{conv}.bias"] = (hidden,)
                keys[f"{p}.7.weight"] = (c, hidden, 1, 1)
                keys.update(_bn(f"{p}.8", c))
            inp, index = c, index + 1
    keys.update({"conv.0.weight": (1280, 320, 1, 1), **_bn("conv.1", 1280)})
    keys.update({"classifier.1.weight": (1000, 1280), "classifier.1.bias": (1000,)})
    return keys


def random_state(shapes: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of these shapes: fan-in scaled weights, BN statistics near identity."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith(("running_mean", "bias")):
            state[key] = torch.randn(shape, generator=gen) * 0.1
        elif len(shape) == 1:  # BN weight
            state[key] = torch.rand(shape, generator=gen) * 0.5 + 0.5
        else:
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return state


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], wrap: str = "bare") -> Path:
    """Save as the source does: safetensors, a bare pickle, or a training checkpoint with
    ``state_dict`` of ``module.``-prefixed keys (ECA-Net, CBAM: epoch, arch, best_prec1,
    optimizer alongside)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".safetensors"):
        safetensors.torch.save_file(state, path)
    elif wrap == "bare":
        torch.save(state, path)
    else:
        wrapped: dict[str, Any] = {
            "epoch": 100,
            "arch": "resnet",
            "state_dict": {f"module.{k}": v for k, v in state.items()},
            "best_prec1": torch.tensor(77.5),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        }
        torch.save(wrapped, path)
    return path


def write_hub_dir(
    directory: Path,
    state: dict[str, torch.Tensor],
    architecture: str,
    *,
    weights: str = "model.safetensors",
    pretrained_cfg: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """A timm hub directory: config.json (as timm's save_config_for_hf writes it) + weights."""
    num_classes = next(
        v.shape[0] for k, v in state.items() if k.endswith(("fc.weight", "last_linear.weight"))
    )
    cfg = {
        "input_size": [3, 224, 224],
        "interpolation": "bicubic",
        "crop_pct": 0.95,
        "crop_mode": "center",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "num_classes": num_classes,
        "tag": "a1_in1k",
        **(pretrained_cfg or {}),
    }
    config = {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": 2048,
        "pretrained_cfg": cfg,
        **extra,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_checkpoint(directory / weights, state)
    return directory
