"""The trainer: one seeded, deterministic recipe for every architecture and attention block.

AdamW with a one-cycle learning rate (warm-up then cosine decay) and label smoothing. A spatial
transformer trains at `stn_lr_scale` times the learning rate (at the full rate the ReLUs of
digits-stn's localisation net all died, leaving theta a constant) and without weight decay
(decay pulls its identity-initialised theta towards a zero-size crop; with it, theta diverged).
Where the data knows each image's object box, `stn_box_loss` adds an L1 loss pulling a front
transformer's theta towards the transform that samples that box (scaled by `stn_box_scale`): a
supervised aid the paper does not use; with the classification loss alone digits-stn learned
one constant zoom. Batches come from a `TrainingData` source as uint8 and are normalised with
statistics measured on the first training epoch, which are then written into the model's data
config.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.attention import SpatialTransformer
from models.attention.stn import box_theta
from models.data_config import DataConfig
from models.package import ModelCard, save_package
from models.registry import create_model
from models.training.data import TrainingData, channel_stats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (with the data source and the seed)."""

    arch: str = "resnet_small"
    attention: str = "none"
    epochs: int = 12
    batch_size: int = 64
    lr: float = 4e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.05
    warmup_pct: float = 0.15
    seed: int = 0
    stn_lr_scale: float = 0.1
    stn_box_loss: float = 0.0
    stn_box_scale: float = 1.0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    max_batches: int | None = None


@dataclass
class TrainResult:
    """A trained model (eval mode, data config filled in), its history and wall time."""

    model: nn.Module
    history: list[dict[str, float]]
    wall_time_s: float


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch and make its kernels deterministic for the duration, then restore the mode."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def to_input(images: np.ndarray, config: DataConfig, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float tensor normalised with the data config's mean and std."""
    mean = torch.tensor(config.mean).view(1, -1, 1, 1)
    std = torch.tensor(config.std).view(1, -1, 1, 1)
    x = (torch.from_numpy(images).float() / 255.0 - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def build_model(config: TrainConfig, data: TrainingData) -> nn.Module:
    """A fresh model for `data`, with mean/std measured on the first training epoch."""
    images, _ = data.epoch(0)
    mean, std = channel_stats(images)
    channels = data.input_size[0]
    data_config = DataConfig(
        input_size=data.input_size, mean=mean, std=std, crop_pct=1.0, labels=data.labels
    )
    return create_model(
        config.arch,
        attention=config.attention,
        num_classes=len(data.labels),
        in_chans=channels,
        data_config=data_config,
        **config.model_kwargs,
    )


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The optimizer's groups: the spatial transformers' parameters (at `stn_lr_scale` times the
    learning rate, no weight decay) and all others."""
    front = [
        p for m in model.modules() if isinstance(m, SpatialTransformer) for p in m.parameters()
    ]
    chosen = {id(p) for p in front}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": config.lr}]
    if front:
        groups.append({"params": front, "lr": config.lr * config.stn_lr_scale, "weight_decay": 0.0})
    return groups


def _batches(count: int, batch_size: int, limit: int | None) -> list[slice]:
    """Full batches only (BatchNorm and SK's pooled BN need more than one sample)."""
    steps = max(count // batch_size, 1)
    if limit is not None:
        steps = min(steps, limit)
    return [slice(i * batch_size, (i + 1) * batch_size) for i in range(steps)]


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 200) -> float:
    """Top-1 accuracy of `model` (put in eval mode) on uint8 images."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch):
        logits = model(to_input(images[start : start + batch], model.data_config))
        correct += int((logits.argmax(1).numpy() == labels[start : start + batch]).sum())
    return correct / max(len(labels), 1)


def _front_transformer(model: nn.Module) -> SpatialTransformer | None:
    """The spatial transformer that works on the input image, if the model has one."""
    stn = getattr(model, "stn", None)
    if isinstance(stn, SpatialTransformer) and getattr(model, "stn_stage", 0) == 0:
        return stn
    return None


def _box_targets(
    model: nn.Module, data: TrainingData, config: TrainConfig, epoch: int
) -> torch.Tensor | None:
    """The epoch's theta targets (N, 2, 3) for the box loss: each box scaled about its centre by
    `stn_box_scale`; None when the loss does not apply."""
    if config.stn_box_loss <= 0 or data.boxes is None or _front_transformer(model) is None:
        return None
    size = (data.input_size[1], data.input_size[2])
    theta = box_theta(torch.from_numpy(data.boxes(epoch)), size)
    theta[:, :, :2] *= config.stn_box_scale  # the linear part; the centre stays
    return theta


def _run_epoch(
    model: nn.Module,
    data: TrainingData,
    config: TrainConfig,
    epoch: int,
    optim: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
    progress: bool,
) -> dict[str, float]:
    optimizer, scheduler = optim
    images, labels = data.epoch(epoch)
    targets = _box_targets(model, data, config, epoch)
    thetas: list[torch.Tensor] = []
    front = _front_transformer(model)
    hook = None
    if targets is not None and front is not None:
        hook = front.theta.register_forward_hook(lambda tap, args, out: thetas.append(out))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(
        _batches(len(labels), config.batch_size, config.max_batches),
        desc=f"{config.attention} epoch {epoch + 1}/{config.epochs}",
        disable=not progress,
        leave=False,
    )
    for part in bar:
        x = to_input(images[part], model.data_config, channels_last=True)
        y = torch.from_numpy(labels[part])
        logits = model(x)
        loss = loss_fn(logits, y)
        if targets is not None:
            loss = loss + config.stn_box_loss * F.l1_loss(thetas.pop(), targets[part])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    if hook is not None:
        hook.remove()
    return {
        "epoch": epoch + 1,
        "loss": round(total_loss / seen, 4),
        "train_accuracy": round(correct / seen, 4),
    }


def train_model(config: TrainConfig, data: TrainingData, progress: bool = True) -> TrainResult:
    """Train a model with `config` on `data`; deterministic for a given seed and thread count."""
    start = time.perf_counter()
    with deterministic(config.seed):
        # channels-last: the CPU convolutions train about 15% faster; stored back contiguous
        model = build_model(config, data).to(memory_format=torch.channels_last)
        steps = len(_batches(len(data.epoch(0)[1]), config.batch_size, config.max_batches))
        groups = param_groups(model, config)
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in groups],
            total_steps=steps * config.epochs,
            pct_start=config.warmup_pct,
        )
        history = []
        for epoch in range(config.epochs):
            row = _run_epoch(model, data, config, epoch, (optimizer, scheduler), progress)
            if data.validation is not None:
                row["val_accuracy"] = round(accuracy(model, *data.validation), 4)
            logger.info("%s: %s", config.attention, row)
            history.append(row)
    model.to(memory_format=torch.contiguous_format).eval()
    return TrainResult(model=model, history=history, wall_time_s=time.perf_counter() - start)


def provenance(config: TrainConfig, data: TrainingData, result: TrainResult) -> dict[str, Any]:
    """The card's `training` entry: data, split, recipe, seed, wall time and versions."""
    recipe = {k: v for k, v in asdict(config).items() if v is not None}
    return {
        **data.provenance,
        **recipe,
        "optimizer": (
            f"AdamW(lr={config.lr}, weight_decay={config.weight_decay}), OneCycleLR "
            f"(warm-up {config.warmup_pct:.0%}, cosine), label smoothing {config.label_smoothing}; "
            f"a spatial transformer at {config.stn_lr_scale} x lr without weight decay"
            + (
                f", box loss {config.stn_box_loss} x L1(theta, the box scaled by "
                f"{config.stn_box_scale})"
                if config.stn_box_loss
                else ""
            )
        ),
        "threads": torch.get_num_threads(),
        "wall_time_s": round(result.wall_time_s, 1),
        "history": result.history,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def save_trained(
    name: str,
    config: TrainConfig,
    data: TrainingData,
    result: TrainResult,
    out: Path,
    metrics: dict[str, Any] | None = None,
) -> ModelCard:
    """Write `result.model` as a package in `out` with a card describing its training."""
    card = ModelCard.from_model(
        result.model, name, training=provenance(config, data, result), metrics=metrics
    )
    return save_package(result.model, card, out)
