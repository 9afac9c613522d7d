"""The one prediction pipeline: encoded images or model-ready tensors in, numbers out.

decode + preprocess + map plan (CPU pool; a small image on the loop) -> the model's batcher -> a
device thread: forward with capture and the batch's maps (`service.forward`) -> one `ImageResult`
per image, in request order. Every protocol adapter parses its request into a call here and
encodes what comes back (through `encode`: in the CPU pool too, or on the loop when the answer is
small). Nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

import numpy as np
import torch

from models import DataConfig
from service.budget import ResultCost, check_budget
from service.errors import BadRequest, DeadlineExceeded, InvalidImage, PayloadTooLarge
from service.forward import ImageResult, Item
from service.hosting import HostedModel
from service.imaging import prepare
from service.maps import MapPlan, MapRequest
from service.observe import current_request, stage
from service.tuning import INLINE_MAX_PIXELS

__all__ = ["Pipeline", "check_count", "gather_all", "prepare_items", "tensor_items"]

V = TypeVar("V")


class Pipeline:
    """Runs requests through hosted models, with the CPU work in `pool`. Work of at most
    `inline_max_bytes` (a request's only image, of at most `INLINE_MAX_PIXELS`; a model-ready
    tensor; an answer's size bound) runs on the event loop instead: the hand-off costs more
    (service.tuning).
    """

    def __init__(
        self,
        pool: Executor,
        *,
        max_image_pixels: int,
        max_images: int,
        request_timeout_s: float,
        max_map_cells: int = 1 << 62,
        max_answer_bytes: int = 1 << 62,
        inline_max_bytes: int = 0,
    ) -> None:
        self._pool = pool
        self.max_image_pixels = max_image_pixels
        self.max_images = max_images
        self.request_timeout_s = request_timeout_s
        self.max_map_cells = max_map_cells
        self.max_answer_bytes = max_answer_bytes
        self.inline_max_bytes = inline_max_bytes
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def tracked(self) -> Iterator[None]:
        """Count a request as in flight while its adapter serves it, so shutdown can wait."""
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (True), or `timeout` seconds (False)."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def check_budget(self, costs: list[ResultCost], images: int, noun: str = "images") -> None:
        """400/413 before any work: the image count (`check_count`), then `images` images
        through results costing `costs` (one per model) against the request budgets
        (`service.budget`). The answer's size bound is kept on the request for `encode`."""
        check_count(images, self.max_images, noun)
        answer_bytes = check_budget(
            costs, images, max_cells=self.max_map_cells, max_answer_bytes=self.max_answer_bytes
        )
        request = current_request()
        if request is not None:
            request.answer_bytes = answer_bytes

    def remaining(self) -> float:
        """Seconds left to the running request: its deadline, set when it arrived (the whole
        request counts: decode, queue, forward and encode), else a full request timeout."""
        request = current_request()
        if request is None or request.deadline is None:
            return self.request_timeout_s
        return request.deadline - time.monotonic()

    async def offload(self, fn: Callable[..., V], *args: Any, inline: bool = False) -> V:
        """`fn(*args)` (decoding, encoding) within the request's deadline (504 past it): in the
        CPU pool, off the event loop, or here on the loop when `inline` (small work)."""
        remaining = self.remaining()
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before its answer was ready")
        if inline:
            return fn(*args)
        try:
            async with asyncio.timeout(remaining):
                return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request did not finish within its deadline ({self.request_timeout_s:g}s)"
            ) from None

    async def encode(self, fn: Callable[..., V], *args: Any) -> V:
        """An adapter's answer encoding, `fn(*args)`, timed as the encode stage: on the loop when
        the request's answer bound (`check_budget`) is small, else in the pool."""
        request = current_request()
        bound = None if request is None else request.answer_bytes
        with stage("encode"):
            return await self.offload(fn, *args, inline=self._small(bound))

    def _small(self, size: int | None) -> bool:
        """Whether work of `size` bytes runs on the loop (None: unknown, so not)."""
        return size is not None and size <= self.inline_max_bytes

    async def predict(
        self, hosted: HostedModel, images: list[bytes], maps: MapRequest
    ) -> list[ImageResult]:
        """One result per encoded image from model `hosted`, in request order."""
        check_count(len(images), self.max_images)
        config = hosted.data_config
        several = len(images) > 1
        prepared = await gather_all(
            self.prepare(data, [config], maps, f"image {i}" if several else "", pool=several)
            for i, data in enumerate(images)
        )
        return await gather_all(self._submit(hosted, item) for (item,) in prepared)

    async def predict_tensors(
        self, hosted: HostedModel, batch: np.ndarray, maps: MapRequest
    ) -> list[ImageResult]:
        """One result per item of a model-ready batch (N, C, H, W): FP32 normalised as the
        model expects, or UINT8 pixels normalised here with the model's data config."""
        check_count(batch.shape[0], self.max_images)
        with stage("decode"):
            small = self._small(batch.nbytes)
            items = await self.offload(tensor_items, batch, hosted.data_config, maps, inline=small)
        return await gather_all(self._submit(hosted, item) for item in items)

    async def compare(
        self, models: list[HostedModel], image: bytes, maps: MapRequest
    ) -> list[ImageResult]:
        """One encoded image through several models (decoded once), one result per model."""
        items = await self.prepare(image, [m.data_config for m in models], maps)
        return await gather_all(
            self._submit(hosted, item) for hosted, item in zip(models, items, strict=True)
        )

    async def prepare(
        self,
        data: bytes,
        configs: list[DataConfig],
        maps: MapRequest,
        label: str = "",
        *,
        pool: bool = False,
    ) -> list[Item]:
        """One image as an item per data config, decoded once: on the loop when it is small (one
        that declares more pixels is refused there before decoding), else in the pool, and
        always there with `pool` (a request's several images, which the pool decodes side by
        side). Errors name the image by `label` when a request has several."""

        def work(max_pixels: int) -> Callable[[], list[Item]]:
            return functools.partial(prepare_items, data, configs, maps, max_pixels=max_pixels)

        try:
            with stage("decode"):
                if not pool and self._small(len(data)):
                    with contextlib.suppress(PayloadTooLarge):
                        small = min(INLINE_MAX_PIXELS, self.max_image_pixels)
                        return await self.offload(work(small), inline=True)
                return await self.offload(work(self.max_image_pixels))
        except (InvalidImage, PayloadTooLarge) as exc:
            if not label:
                raise
            raise type(exc)(f"{label}: {exc.detail}") from None

    async def _submit(self, hosted: HostedModel, item: Item) -> ImageResult:
        with self._deadline_detail():
            return await hosted.submit(item, self.remaining())

    @contextlib.contextmanager
    def _deadline_detail(self) -> Iterator[None]:
        """A model's DeadlineExceeded, with the request timeout named."""
        try:
            yield
        except DeadlineExceeded as exc:
            raise DeadlineExceeded(
                f"{exc.detail} (the request timeout is {self.request_timeout_s:g}s)"
            ) from None


def check_count(count: int, limit: int, noun: str = "images") -> None:
    """400 for a request without images; 413 above the per-request limit (a size limit of the
    payload, like the byte limit). `noun`: what the protocol calls them."""
    if count == 0:
        raise BadRequest(
            "the request carries no image (batch size 0); send file parts (multipart/form-data), "
            'a raw image body, JSON {"images": [<base64>, ...]}, or a v2 input of batch size >= 1'
        )
    if count > limit:
        raise PayloadTooLarge(
            f"the request carries {count} {noun}, more than the limit of {limit} per "
            "request. Hint: split it into several requests."
        )


def prepare_items(
    data: bytes, configs: list[DataConfig], maps: MapRequest, *, max_pixels: int
) -> list[Item]:
    """One image decoded once and preprocessed for each config, with its map plan."""
    return [
        Item(p.tensor, MapPlan.for_image(p.geometry, maps), p.geometry)
        for p in prepare(data, configs, max_pixels=max_pixels)
    ]


def tensor_items(batch: np.ndarray, config: DataConfig, maps: MapRequest) -> list[Item]:
    """Items from a model-ready batch: FP32 as given (finite values only), UINT8 pixels scaled
    to [0, 1] and normalised with the config's mean and std."""
    if batch.dtype == np.uint8:
        mean = np.asarray(config.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(config.std, dtype=np.float32).reshape(1, -1, 1, 1)
        values = (batch.astype(np.float32) / np.float32(255.0) - mean) / std
    else:
        values = np.asarray(batch, dtype=np.float32)
        if not np.isfinite(values).all():
            raise BadRequest("the input tensor holds NaN or infinite values")
    tensors = torch.from_numpy(np.array(values, dtype=np.float32)).unbind(0)  # a writable copy
    plan = MapPlan.for_image(None, maps)
    return [Item(tensor, plan) for tensor in tensors]


async def gather_all(awaitables: Iterable[Awaitable[V]]) -> list[V]:
    """Like asyncio.gather, but the first failure cancels the others (no orphaned queue items)."""
    pending = list(awaitables)
    if len(pending) == 1:  # nothing to run beside it
        return [await pending[0]]
    tasks = [asyncio.ensure_future(a) for a in pending]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
