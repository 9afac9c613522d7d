"""The per-request flow: decode -> batch -> predict -> unbatch -> build the response data.

Decoding, preprocessing and response building run in the CPU pool; the forward pass, and the
attention maps of the whole batch, on the device thread (through the model's batcher); the event
loop only coordinates. A request whose client went away is cancelled, so the batcher drops its
items before they reach the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import torch

from models import AttentionRecord, DataConfig
from service.cpupool import CpuPool
from service.errors import ClientDisconnected, InvalidImage, PayloadTooLarge
from service.imaging import Prepared, prepare
from service.maps import ImageMaps, MapOptions, MapPlan, build_result, prepare_maps

if TYPE_CHECKING:
    from service.registry import HostedModel
    from service.worker import BatchOutput, ModelRunner

__all__ = [
    "ItemOutput",
    "PredictItem",
    "Predictor",
    "forward_items",
    "make_batch_handler",
    "split_items",
]

V = TypeVar("V")
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class PredictItem:
    """One image queued for a model: its input tensor (C, H, W), whether attention is
    captured, and the maps to prepare for it with its batch (None: raw tensors only)."""

    tensor: torch.Tensor
    capture: bool
    maps: MapPlan | None = None


@dataclass(frozen=True, slots=True)
class ItemOutput:
    """One image's share of a batch: item `index` of the batch's output, sliced on access,
    and its maps when its item had a plan.

    Slicing happens where the fields are read (the CPU pool), not when the batch finishes, so
    the event loop hands a finished batch to its waiters without per-item tensor work.
    probs is (K,); records and summary keep a batch dimension of 1.
    """

    batch: BatchOutput
    index: int
    maps: ImageMaps | None = None

    @property
    def probs(self) -> torch.Tensor:
        return self.batch.probs[self.index]

    @property
    def records(self) -> list[AttentionRecord]:
        i = self.index
        return [
            AttentionRecord(r.site, r.block, r.kind, r.tensor[i : i + 1], r.derived)
            for r in self.batch.records
        ]

    @property
    def summary(self) -> torch.Tensor | None:
        summary = self.batch.summary
        return None if summary is None else summary[self.index : self.index + 1]


def make_batch_handler(runner: ModelRunner) -> Callable[[list[PredictItem]], list[ItemOutput]]:
    """The batcher's handler, run on a device thread: `forward_items`, then `split_items`.

    Stacking and the maps run on the device thread too: a few ops per batch that never wait
    behind queued decoding work, instead of a few per image in the CPU pool, and the event
    loop runs no torch op (see worker.use_one_thread).
    """

    def handle(items: list[PredictItem]) -> list[ItemOutput]:
        return split_items(forward_items(runner, items), items)

    return handle


def forward_items(runner: ModelRunner, items: list[PredictItem]) -> BatchOutput:
    """One forward of the items' tensors (stacked by the traced graph itself, see
    service.graph), capturing attention if any item asks."""
    capture = any(item.capture for item in items)
    return runner.forward([item.tensor for item in items], capture)


def split_items(out: BatchOutput, items: list[PredictItem]) -> list[ItemOutput]:
    """One output per item, with the maps of the whole batch prepared at once (`prepare_maps`)."""
    maps = prepare_maps(out.records, out.summary, [item.maps for item in items])
    return [ItemOutput(out, i, m) for i, m in enumerate(maps)]


class Predictor:
    """Runs requests through hosted models using the shared CPU pool."""

    def __init__(self, pool: CpuPool, *, max_image_pixels: int, request_timeout_s: float) -> None:
        self._pool = pool
        self._max_pixels = max_image_pixels
        self._timeout = request_timeout_s
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        """Count a request as in flight, so shutdown can wait for its post-processing."""
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def tracked(self) -> contextlib.AbstractContextManager[None]:
        """Count a request served outside this class (the v2 route) as in flight, for shutdown."""
        return self._tracked()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (True), or `timeout` seconds (False)."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def _cpu(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., V], *args: Any) -> V:
        """`fn(*args)` in the CPU pool. The caller passes its running loop: on Python 3.11
        every `asyncio.get_running_loop()` is a getpid system call."""
        return await self._pool.call(loop, fn, *args)

    async def _prepare(
        self,
        loop: asyncio.AbstractEventLoop,
        data: bytes,
        configs: list[DataConfig],
        label: str,
        options: MapOptions,
    ) -> list[tuple[Prepared, PredictItem]]:
        """Decode, preprocess and plan the maps in the pool (a new image size builds its
        sampling grid there, not on the event loop); errors name the image when there are
        several."""
        try:
            return await self._cpu(
                loop,
                functools.partial(
                    prepare_items, data, configs, options, max_pixels=self._max_pixels
                ),
            )
        except (InvalidImage, PayloadTooLarge) as exc:
            if not label:
                raise
            raise type(exc)(f"{label}: {exc.detail}") from None

    async def predict(
        self, hosted: HostedModel, images: list[bytes], options: MapOptions, receive: Receive
    ) -> list[orjson.Fragment]:
        """One result per image from model `hosted`, in request order, already JSON-encoded
        (in the CPU pool: a maps=all result of a 64-cell map size is 100-200 KB, too much work
        for the event loop)."""
        with self._tracked():
            return await self._predict(hosted, images, options, receive)

    async def _predict(
        self, hosted: HostedModel, images: list[bytes], options: MapOptions, receive: Receive
    ) -> list[orjson.Fragment]:
        loop = asyncio.get_running_loop()
        if len(images) == 1:  # the common case, without the tasks that gather_all creates
            ((prepared, item),) = await self._prepare(
                loop, images[0], [hosted.data_config], "", options
            )
            out = await until_disconnect(receive, hosted.enqueue(item, self._timeout), loop)
            return [await self._cpu(loop, self._encoded, hosted, out, prepared, options)]
        config = [hosted.data_config]
        prepared_all = await gather_all(
            self._prepare(loop, data, config, f"image {i}", options)
            for i, data in enumerate(images)
        )
        submits = (hosted.submit(item, self._timeout) for ((_, item),) in prepared_all)
        outputs = await until_disconnect(receive, gather_all(submits), loop)
        return await gather_all(
            self._cpu(loop, self._encoded, hosted, out, p, options)
            for out, ((p, _),) in zip(outputs, prepared_all, strict=True)
        )

    async def compare(
        self, hosted: list[HostedModel], image: bytes, options: MapOptions, receive: Receive
    ) -> list[dict[str, Any]]:
        """One result per model for the same image, each with a "model" key, in `hosted` order."""
        with self._tracked():
            return await self._compare(hosted, image, options, receive)

    async def _compare(
        self, hosted: list[HostedModel], image: bytes, options: MapOptions, receive: Receive
    ) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        configs = [m.data_config for m in hosted]
        prepared = await self._prepare(loop, image, configs, "", options)
        submits = (
            m.submit(item, self._timeout) for m, (_, item) in zip(hosted, prepared, strict=True)
        )
        outputs = await until_disconnect(receive, gather_all(submits), loop)
        results = await gather_all(
            self._cpu(loop, self._result, m, out, p, options)
            for m, out, (p, _) in zip(hosted, outputs, prepared, strict=True)
        )
        return [{"model": m.name, **r} for m, r in zip(hosted, results, strict=True)]

    @staticmethod
    def _encoded(
        hosted: HostedModel, out: ItemOutput, prepared: Prepared, options: MapOptions
    ) -> orjson.Fragment:
        result = Predictor._result(hosted, out, prepared, options)
        return orjson.Fragment(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY))

    @staticmethod
    def _result(
        hosted: HostedModel, out: ItemOutput, prepared: Prepared, options: MapOptions
    ) -> dict[str, Any]:
        labels = hosted.data_config.labels
        return build_result(out.probs, out.maps, prepared.geometry, labels, options)


def prepare_items(
    data: bytes, configs: list[DataConfig], options: MapOptions, *, max_pixels: int
) -> list[tuple[Prepared, PredictItem]]:
    """One image decoded and preprocessed for each config, with the item to queue for it."""
    capture = options.maps != "none"
    return [
        (p, PredictItem(p.tensor, capture, MapPlan.for_image(p.geometry, options)))
        for p in prepare(data, configs, max_pixels=max_pixels)
    ]


async def gather_all(awaitables: Iterable[Awaitable[V]]) -> list[V]:
    """Like asyncio.gather, but the first failure cancels the others (no orphaned queue items)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


async def _cancel_on_disconnect(receive: Receive, work: asyncio.Future[Any]) -> None:
    """Cancel `work` once the ASGI server reports that the client went away."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            work.cancel()
            return


async def until_disconnect(
    receive: Receive, work: Awaitable[V], loop: asyncio.AbstractEventLoop | None = None
) -> V:
    """Await `work`, cancelling it (and raising ClientDisconnected) if the client disconnects.

    A coroutine `work` runs as a task; a future (such as `Batcher.enqueue`'s) is awaited as it
    is, which saves a task per request. A watcher task cancels it on a disconnect. Awaiting
    `work` directly (instead of `asyncio.wait` on both) and passing the running `loop` keep the
    event loop's share of a request small (README "Benchmarks")."""
    loop = loop if loop is not None else asyncio.get_running_loop()
    task = asyncio.ensure_future(work, loop=loop)
    watcher = loop.create_task(_cancel_on_disconnect(receive, task))
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled() and watcher.exception() is None:
            # the watcher saw the disconnect and cancelled the work
            message = "the client disconnected before the answer was ready"
            raise ClientDisconnected(message) from None
        raise
    finally:
        watcher.cancel()
