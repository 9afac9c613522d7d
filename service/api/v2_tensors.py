"""Model-side tensors of the v2 route: request inputs -> model input items -> response outputs.

Images are decoded and preprocessed by `service.imaging` in the CPU pool exactly as /v1 does;
tensors already shaped like the model input are checked and normalised. Outputs are built from the
per-item results of the model's batcher, in the CPU pool too.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from service.api.v2_codec import InputTensor, OutputTensor, Requested, encode_response
from service.errors import BadRequest, InvalidImage, NotReady, PayloadTooLarge
from service.imaging import Geometry, Prepared, prepare
from service.maps import map_grid, output_size, to_original
from service.pipeline import ItemOutput, gather_all
from service.registry import HostedModel
from service.state import Services

__all__ = [
    "IMAGE",
    "MAP_SIZE",
    "PROBABILITIES",
    "SITE_PREFIX",
    "SUMMARY",
    "TENSOR",
    "classification",
    "cpu",
    "encode_outputs",
    "prepare_inputs",
]

V = TypeVar("V")
IMAGE, TENSOR = "image", "input"
PROBABILITIES, SUMMARY, SITE_PREFIX = "probabilities", "attention_summary", "attention/"
MAP_SIZE = 64


async def cpu(services: Services, fn: Callable[..., V], *args: Any) -> V:
    """Run `fn(*args)` in the service's CPU pool (decoding, normalising, building outputs)."""
    pool = services.pool
    if pool is None:
        raise NotReady("the service is starting")
    return await pool.call(asyncio.get_running_loop(), fn, *args)


def _check_count(count: int, services: Services) -> None:
    """400 for an empty batch; 413 above max_images_per_request, as /v1 counts images."""
    limit = services.settings.max_images_per_request
    if count == 0:
        raise BadRequest("the input holds no item (batch size 0)")
    if count > limit:
        raise PayloadTooLarge(
            f"the request carries {count} items, more than the limit of {limit} per request. "
            "Hint: split it into several requests."
        )


async def prepare_inputs(
    services: Services, hosted: HostedModel, tensor: InputTensor
) -> tuple[list[torch.Tensor], list[Geometry] | None]:
    """Model input tensors (C, H, W) per item, with each image's geometry (None for tensors)."""
    shape = tensor.shape
    if tensor.name == IMAGE:
        if tensor.datatype != "BYTES" or len(shape) not in (1, 2) or shape[1:] not in ((), (1,)):
            raise BadRequest(
                f"input {IMAGE!r} must be BYTES with shape [N] or [N, 1], "
                f"got {tensor.datatype} {list(shape)}"
            )
        _check_count(shape[0], services)
        several = shape[0] > 1
        prepared = await gather_all(
            _decode(services, hosted, data, f"image {i}" if several else "")
            for i, data in enumerate(tensor.data)
        )
        return [p.tensor for p in prepared], [p.geometry for p in prepared]
    expected = [-1, *hosted.data_config.input_size]
    if (
        tensor.datatype not in ("FP32", "UINT8")
        or len(shape) != 4
        or list(shape[1:]) != expected[1:]
    ):
        raise BadRequest(
            f"input {TENSOR!r} must be FP32 or UINT8 with shape {expected} (N, C, H, W), "
            f"got {tensor.datatype} {list(shape)}"
        )
    _check_count(shape[0], services)
    return await cpu(services, _normalise, tensor.data, hosted), None


async def _decode(services: Services, hosted: HostedModel, data: bytes, label: str) -> Prepared:
    """Decode and preprocess one image in the pool, exactly as /v1 does."""
    config, limit = hosted.data_config, services.settings.max_image_pixels
    try:
        (prepared,) = await cpu(
            services, functools.partial(prepare, max_pixels=limit), data, [config]
        )
    except (InvalidImage, PayloadTooLarge) as exc:
        if not label:
            raise
        raise type(exc)(f"{label}: {exc.detail}") from None
    return prepared


def _normalise(array: np.ndarray, hosted: HostedModel) -> list[torch.Tensor]:
    """FP32 as given (finite values only); UINT8 pixels scaled to [0, 1] and normalised."""
    batch = torch.from_numpy(np.array(array, dtype=np.float32))
    if array.dtype == np.uint8:
        config = hosted.data_config
        mean = torch.tensor(config.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(config.std, dtype=torch.float32).view(1, -1, 1, 1)
        batch = (batch / 255.0 - mean) / std
    elif not bool(torch.isfinite(batch).all()):
        raise BadRequest(f"input {TENSOR!r} holds NaN or infinite values")
    return list(batch.unbind(0))


def encode_outputs(
    hosted: HostedModel,
    wanted: list[Requested],
    outs: list[ItemOutput],
    geometries: list[Geometry] | None,
    head: dict[str, Any],
) -> tuple[bytes, int | None]:
    """The response body (and header length if binary) from the per-item outputs."""
    tensors = []
    for request in wanted:
        if request.name == PROBABILITIES:
            tensors.append(_probabilities(request, outs, hosted.data_config.labels))
        elif request.name == SUMMARY:
            tensors.append(_summary(request, outs, geometries))
        else:
            tensors.append(_site(request, outs))
    return encode_response(head, tensors)


def _probabilities(
    request: Requested, outs: list[ItemOutput], labels: tuple[str, ...]
) -> OutputTensor:
    probs = torch.stack([o.probs for o in outs]).float().numpy()
    if request.classes:
        return classification(request.name, probs, labels, request.classes, request.binary)
    return OutputTensor(request.name, "FP32", probs.shape, probs, request.binary)


def _summary(
    request: Requested, outs: list[ItemOutput], geometries: list[Geometry] | None
) -> OutputTensor:
    """Mapped onto the original images when all get the same map shape, else the input grid."""
    maps = [o.summary[0] for o in outs if o.summary is not None]
    grid = "input"
    if geometries and len({output_size(g.width, g.height, MAP_SIZE) for g in geometries}) == 1:
        maps = [
            to_original(m, *map_grid(g, MAP_SIZE)) for m, g in zip(maps, geometries, strict=True)
        ]
        grid = "original"
    stacked = torch.stack(maps).float().numpy()
    return OutputTensor(SUMMARY, "FP32", stacked.shape, stacked, request.binary, {"grid": grid})


def _site(request: Requested, outs: list[ItemOutput]) -> OutputTensor:
    """One site's tensor per item at native resolution (GC context scaled so uniform = 1)."""
    site, kind = request.name[len(SITE_PREFIX) :].rsplit("/", 1)
    values = []
    for out in outs:
        record = next(r for r in out.records if r.site == site and r.kind == kind)
        tensor = record.tensor[0]
        if kind in ("spatial", "context"):
            tensor = tensor[0] * (tensor[0].numel() if kind == "context" else 1)
        elif kind in ("coord_h", "coord_w"):
            tensor = tensor.reshape(tensor.shape[0], -1)
        values.append(tensor.float())
    stacked = torch.stack(values).numpy()
    return OutputTensor(request.name, "FP32", stacked.shape, stacked, request.binary)


def classification(
    name: str, probs: np.ndarray, labels: tuple[str, ...], k: int, binary: bool
) -> OutputTensor:
    """The classification extension: BYTES [N, k] of "<value>:<index>:<label>", highest first."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    strings = [
        f"{probs[n, i]:f}:{i}:{labels[i]}".encode() for n, row in enumerate(order) for i in row
    ]
    return OutputTensor(name, "BYTES", (probs.shape[0], k), strings, binary)
