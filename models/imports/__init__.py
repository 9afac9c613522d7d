"""`attnserve import`: turn a timm / Hugging Face hub directory or a torchvision / official
checkpoint into a model package (model.safetensors + card.json) that the service serves.

The architecture and block come from timm's ``config.json`` or, for a bare checkpoint, from its
keys (`models.imports.layouts`); loading is strict (every source key is consumed, every model
tensor is supplied, shapes agree). Preprocessing comes from timm's ``pretrained_cfg``, else the
torchvision / official ImageNet evaluation (resize 256, centre crop 224, bilinear, ImageNet
mean/std); labels from ``--labels``, the config's ``label_names``, or the ImageNet-1k names for a
1000-class model. The package is written to a temporary sibling directory, read back with
`load_package` and checked against the imported model before it is renamed into place, so a
failed import leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from models.data import imagenet_classes
from models.data_config import INTERPOLATIONS, DataConfig, default_labels, imagenet_data_config
from models.imports.layouts import LAYOUTS, Plan, resolve
from models.imports.sources import ImportFailed, Source, read_source
from models.package import ModelCard, load_package, save_package
from models.registry import create_model, list_models

__all__ = ["LAYOUTS", "ImportFailed", "import_source", "read_source", "timm_architecture"]

_PROBE_SIZE = 64


def import_source(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    arch: str | None = None,
    attention: str | None = None,
    labels_file: str | os.PathLike[str] | None = None,
) -> ModelCard:
    """Import `source` into the package directory `out` (absent or empty); returns its card.

    ImportFailed (a ValueError) names what does not fit; nothing is written then.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ImportFailed(f"{out}: exists and is not an empty directory; choose another --out")
    src = read_source(source)
    if src.config is not None and arch is None:
        arch, timm_block = timm_architecture(src.config.get("architecture"))
        attention = attention or timm_block
    try:
        plan = resolve(src.tensors, arch=arch, attention=attention)
    except ValueError as exc:
        raise ImportFailed(f"{src.weights_file}: {exc}") from None
    config, labels_from = _data_config(src, plan, labels_file)
    with torch.device("meta"):
        model = create_model(
            plan.arch,
            plan.attention,
            plan.num_classes,
            plan.in_chans,
            data_config=config,
            **plan.model_kwargs,
        )
    model.load_state_dict(plan.state, strict=True, assign=True)
    model.eval()
    provenance = _provenance(src, plan, labels_from)
    try:
        card = ModelCard.from_model(model, name or out.name, training={"import": provenance})
    except ValueError as exc:
        raise ImportFailed(f"cannot describe the imported model: {exc}") from None
    return _write(model, card, out)


def timm_architecture(name: Any) -> tuple[str, str]:
    """The registry arch and block of a timm architecture name (`seresnet50` -> resnet50 + se)."""
    table = _timm_names()
    if isinstance(name, str) and name in table:
        return table[name]
    raise ImportFailed(
        f"unknown architecture {name!r} in config.json; supported timm architectures: "
        f"{sorted(table)}"
    )


def _timm_names() -> dict[str, tuple[str, str]]:
    """timm name -> (arch, block): the block is a prefix of timm's name (se, eca, sk for the
    ResNeXts, legacy_se for the Caffe layout)."""
    table = {}
    for arch in list_models():
        if arch.startswith("legacy_"):
            table["legacy_se" + arch[len("legacy_") :]] = (arch, "se")
        elif arch.startswith(("resnet", "resnext")) and arch != "resnet_small":
            table.update({arch: (arch, "none"), "se" + arch: (arch, "se")})
            table["eca" + arch] = (arch, "eca")
            if arch.startswith("resnext"):
                table["sk" + arch] = (arch, "sk")
    return table


def _data_config(
    src: Source, plan: Plan, labels_file: str | os.PathLike[str] | None
) -> tuple[DataConfig, str]:
    """The package's data config: timm's pretrained_cfg or the ImageNet defaults, and labels."""
    config = imagenet_data_config(plan.in_chans, plan.num_classes)
    cfg = (src.config or {}).get("pretrained_cfg") or {}
    if src.config is not None:
        declared = src.config.get("num_classes", plan.num_classes)
        if declared != plan.num_classes:
            raise ImportFailed(
                f"config.json says num_classes={declared!r}, the weights have {plan.num_classes}"
            )
        if cfg.get("crop_mode", "center") != "center":
            raise ImportFailed(
                f"pretrained_cfg crop_mode {cfg['crop_mode']!r} is not supported (only 'center')"
            )
        if cfg.get("interpolation", "bilinear") not in INTERPOLATIONS:
            raise ImportFailed(
                f"pretrained_cfg interpolation {cfg['interpolation']!r} is not supported; "
                f"valid: {list(INTERPOLATIONS)}"
            )
    labels, labels_from = _labels(src.config or {}, plan.num_classes, labels_file)
    try:
        config = replace(
            config,
            input_size=tuple(cfg.get("input_size", config.input_size)),
            mean=tuple(cfg.get("mean", config.mean)),
            std=tuple(cfg.get("std", config.std)),
            interpolation=cfg.get("interpolation", config.interpolation),
            crop_pct=cfg.get("crop_pct", config.crop_pct),
            labels=labels,
        )
    except (TypeError, ValueError) as exc:
        raise ImportFailed(f"config.json pretrained_cfg: {exc}") from None
    if config.channels != plan.in_chans:
        raise ImportFailed(
            f"pretrained_cfg input_size {config.input_size} does not fit the weights' "
            f"{plan.in_chans} input channels"
        )
    return config, labels_from


def _labels(
    config: dict[str, Any], num_classes: int, labels_file: str | os.PathLike[str] | None
) -> tuple[tuple[str, ...], str]:
    """Class names and where they came from: --labels, config label_names, ImageNet-1k, indices."""
    if labels_file is not None:
        path = Path(labels_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ImportFailed(f"--labels {path}: {exc}") from None
        while lines and not lines[-1].strip():
            lines.pop()
        names, source = tuple(line.strip() for line in lines), f"file {path.name}"
    elif config.get("label_names"):
        raw = config["label_names"]
        if isinstance(raw, dict):
            raw = [raw.get(str(i), raw.get(i, str(i))) for i in range(num_classes)]
        descriptions = config.get("label_descriptions") or {}
        names = tuple(str(descriptions.get(n, n)) for n in raw)
        source = "config.json label_names"
    elif num_classes == 1000:
        return imagenet_classes(), "imagenet-1k"
    else:
        return default_labels(num_classes), "class indices"
    if len(names) != num_classes:
        raise ImportFailed(f"{source} has {len(names)} labels, the weights {num_classes} classes")
    return names, source


def _provenance(src: Source, plan: Plan, labels_from: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "source": src.weights_file.name
        if src.config is None
        else f"{src.weights_file.parent.name}/{src.weights_file.name}",
        "sha256": src.sha256,
        "wrapping": src.wrapping,
        "layout": plan.layout,
        "labels": labels_from,
    }
    if src.config is not None:
        info["timm_architecture"] = src.config.get("architecture")
        tag = (src.config.get("pretrained_cfg") or {}).get("tag")
        if tag:
            info["timm_tag"] = tag
    if plan.filled_counters:
        info["bn_counters_set_to_zero"] = plan.filled_counters
    return info


def _write(model: torch.nn.Module, card: ModelCard, out: Path) -> ModelCard:
    """Save to a temporary sibling, check the package reproduces the model (to float rounding:
    the kernels may differ with the tensors' memory alignment), rename into place."""
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        card = save_package(model, card, tmp)
        loaded, _ = load_package(tmp)
        size = (min(_PROBE_SIZE, card.data_config.input_size[1]),) * 2
        probe = torch.rand((1, card.in_chans, *size), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            if not torch.allclose(loaded(probe), model(probe), rtol=1e-4, atol=1e-5):
                raise ImportFailed("the written package does not reproduce the imported model")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card
