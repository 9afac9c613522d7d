"""The in-process limit: the service's own pipeline with no HTTP, timed stage by stage.

Per batch of images: `service.pipeline.prepare_items` (decode, preprocess, map plan),
`ModelRunner.forward` with capture and the summary map on a `DeviceWorker`,
`service.maps.batch_maps` (what `service.forward.run_batch` does on the device thread), then the
/v1 answer
(`service.api.encode.image_answer`) and its orjson encoding. The stages run one after another in
one process, so the sum is the work the server must do per request, minus everything HTTP adds.
The budget is split in three parts and the median part counts, so a burst of other load in one
part does not lower the limit.

With `instances` > 1 the pipeline runs that many of those sequences side by side (one CPU thread
each, feeding a device worker with as many instances), the in-process form of a server with
several device instances; the limit is then their summed rate.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import cycle, islice
from typing import Any

import orjson
import torch

from models import DataConfig
from service.api.encode import image_answer
from service.api.schemas import PredictOptions as MapOptions
from service.device import DeviceWorker, resolve_device
from service.forward import ImageResult
from service.maps import batch_maps
from service.pipeline import prepare_items
from service.repository import discover
from service.runner import BatchOutput, ModelRunner
from service.settings import Settings
from service.tuning import keep_freed_memory

__all__ = ["InProcessPipeline", "LoadedModel", "load_model"]

STAGES = ("decode_preprocess", "forward", "maps", "build", "encode")
MAX_ROUNDS = 100_000


@dataclass
class LoadedModel:
    """A hosted model built exactly as the server builds it, on the benchmark's device."""

    name: str
    runner: ModelRunner
    data_config: DataConfig


def load_model(
    name: str,
    *,
    device: str = "cpu",
    random_models: tuple[str, ...] = (),
) -> LoadedModel:
    """Discover `name` with the service's registry (zoo package or random weights) and load it.

    Call it on the thread that will run the forward passes, as the server does on its device
    thread.
    """
    config = Settings(models=[], random_models=list(random_models), device=device)
    sources = {source.name: source for source in discover(config)}
    if name not in sources:
        raise ValueError(f"no model {name!r}; available: {sorted(sources)}")
    runner = ModelRunner(
        name,
        sources[name].build(),
        device=resolve_device(device),
        autocast=config.autocast,
        channels_last=config.channels_last,
        trace=config.trace_models,
    )
    runner.warmup([1])
    return LoadedModel(name, runner, runner.model.data_config)


class InProcessPipeline:
    """Times the request pipeline of one model without the server; `close()` when done.

    The model is built, warmed up and run on a `DeviceWorker` with `instances` device threads
    of `threads` intra-op threads each (None: torch's default divided among the instances),
    like the server's device worker: its own, or `worker` when given (shared by the pipelines
    of several models, as the server shares one; each extra OpenMP team in the process would
    otherwise make libgomp stop spin-waiting and slow every parallel region).
    """

    def __init__(
        self,
        name: str,
        *,
        device: str = "cpu",
        random_models: tuple[str, ...] = (),
        threads: int | None = None,
        instances: int = 1,
        max_image_pixels: int = 40_000_000,
        worker: DeviceWorker | None = None,
    ) -> None:
        self.max_pixels = max_image_pixels
        if resolve_device(device).type == "cpu" and Settings(models=[]).malloc_keep_freed:
            keep_freed_memory()  # as the server does
        self._own_worker = worker is None
        if worker is None:
            worker = DeviceWorker(resolve_device(device), threads=threads, instances=instances)
        self._worker = worker
        self.instances = instances = worker.instances
        self._cpu = ThreadPoolExecutor(instances, thread_name_prefix="inprocess-cpu")
        self._loop = asyncio.new_event_loop()
        load = self._worker.run(load_model, name, device=device, random_models=random_models)
        self.model: LoadedModel = self._loop.run_until_complete(load)
        self.threads = self._loop.run_until_complete(self._worker.run(torch.get_num_threads))

    def close(self) -> None:
        """Stop the CPU threads, the private event loop and the device worker if it is ours."""
        self._cpu.shutdown()
        self._loop.close()
        if self._own_worker:
            self._worker.close()

    def _round(
        self, images: list[bytes], options: MapOptions, loop: asyncio.AbstractEventLoop
    ) -> tuple[list[float], int]:
        """One batch through every stage: seconds per stage and the encoded bytes."""
        config = self.model.data_config
        request = options.map_request()
        t0 = time.perf_counter()
        items = [prepare_items(d, [config], request, max_pixels=self.max_pixels)[0] for d in images]
        t1 = time.perf_counter()
        batch = torch.stack([item.tensor for item in items])
        capture = options.maps != "none"
        runner = self.model.runner
        out: BatchOutput = loop.run_until_complete(self._worker.run(runner.forward, batch, capture))
        t2 = time.perf_counter()
        plans = [item.plan for item in items]
        maps = loop.run_until_complete(
            self._worker.run(batch_maps, out.records, out.summary, plans)
        )
        t3 = time.perf_counter()
        probs = out.probs.numpy()
        answers = [
            image_answer(ImageResult(probs[i], item.geometry, m), config.labels, options)
            for i, (item, m) in enumerate(zip(items, maps, strict=True))
        ]
        t4 = time.perf_counter()
        bodies = [
            orjson.dumps(
                {"model": self.model.name, "results": [a]}, option=orjson.OPT_SERIALIZE_NUMPY
            )
            for a in answers
        ]
        t5 = time.perf_counter()
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4], sum(len(b) for b in bodies)

    def measure(
        self,
        images: list[bytes],
        *,
        batch_size: int,
        options: MapOptions,
        budget_s: float,
        repeats: int = 3,
        min_rounds: int = 3,
    ) -> dict[str, Any]:
        """Rounds of `batch_size` images (cycling through `images`) for about `budget_s` seconds,
        in `repeats` parts; the median part is the limit (see the module docstring), and every
        part's rate is kept as `repeat_rps`.

        With several instances, one sequence per instance runs at the same time and each part's
        rate is their sum."""
        start = threading.Barrier(self.instances, action=self._mark)
        self._marks: list[tuple[float, float]] = []  # (wall, process CPU) at each part's edge
        jobs = [
            self._cpu.submit(
                self._measure, images[k:] + images[:k], batch_size, options, budget_s,
                repeats, min_rounds, start,
            )
            for k in range(self.instances)
        ]  # fmt: skip
        per_instance = [job.result() for job in jobs]
        parts = [_combine(list(part)) for part in zip(*per_instance, strict=True)]
        for i, part in enumerate(parts):  # process CPU over each part, all instances together
            (t0, cpu0), (t1, cpu1) = self._marks[i], self._marks[i + 1]
            part["cpu_ms_per_image"] = round(1000.0 * (cpu1 - cpu0) / part["images"], 4)
            part["cpu_cores"] = round((cpu1 - cpu0) / (t1 - t0), 3)
        median = sorted(parts, key=lambda part: part["limit_rps"])[len(parts) // 2]
        median["repeat_rps"] = [round(part["limit_rps"], 2) for part in parts]
        median["instances"] = self.instances
        return median

    def _mark(self) -> None:
        self._marks.append((time.perf_counter(), time.process_time()))

    def _measure(
        self,
        images: list[bytes],
        batch_size: int,
        options: MapOptions,
        budget_s: float,
        repeats: int,
        min_rounds: int,
        start: threading.Barrier,
    ) -> list[dict[str, Any]]:
        batch_size = max(1, batch_size)
        source = cycle(images)
        loop = asyncio.new_event_loop()  # each CPU thread awaits its device calls on its own loop
        try:
            self._round(list(islice(source, batch_size)), options, loop)
            parts = []
            for _ in range(max(1, repeats)):
                start.wait()
                parts.append(
                    self._timed(source, batch_size, options, budget_s / repeats, min_rounds, loop)
                )
            start.wait()  # every instance finished the last part
            return parts
        finally:
            loop.close()

    def _timed(
        self,
        source: Iterator[bytes],
        batch_size: int,
        options: MapOptions,
        budget_s: float,
        min_rounds: int,
        loop: asyncio.AbstractEventLoop,
    ) -> dict[str, Any]:
        """Rounds for `budget_s` seconds (at least `min_rounds`), summarised."""
        rounds: list[list[float]] = []
        body_bytes = 0
        deadline = time.perf_counter() + budget_s
        while len(rounds) < MAX_ROUNDS and (
            len(rounds) < min_rounds or time.perf_counter() < deadline
        ):
            stages, size = self._round(list(islice(source, batch_size)), options, loop)
            rounds.append(stages)
            body_bytes += size
        summary = _summarise(rounds, batch_size, body_bytes, options)
        summary["torch_threads"] = self.threads
        return summary


def _combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One part measured by every instance at once: rates add up, per-image times average."""
    if len(parts) == 1:
        return parts[0]
    combined = dict(parts[0])
    images = sum(p["images"] for p in parts)
    combined["rounds"] = sum(p["rounds"] for p in parts)
    combined["images"] = images
    combined["limit_rps"] = sum(p["limit_rps"] for p in parts)
    combined["ms_per_image"] = {
        stage: round(sum(p["ms_per_image"][stage] * p["images"] for p in parts) / images, 4)
        for stage in parts[0]["ms_per_image"]
    }
    combined["forward_ms_per_batch"] = round(
        sum(p["forward_ms_per_batch"] * p["rounds"] for p in parts) / combined["rounds"], 4
    )
    combined["round_ms_median"] = round(statistics.median(p["round_ms_median"] for p in parts), 4)
    combined["response_bytes_mean"] = (
        sum(p["response_bytes_mean"] * p["images"] for p in parts) / images
    )
    return combined


def _summarise(
    rounds: list[list[float]], batch_size: int, body_bytes: int, options: MapOptions
) -> dict[str, Any]:
    images = len(rounds) * batch_size
    totals = [sum(r) for r in rounds]
    per_stage = {
        stage: 1000.0 * sum(r[i] for r in rounds) / images for i, stage in enumerate(STAGES)
    }
    per_stage["total"] = 1000.0 * sum(totals) / images
    return {
        "batch_size": batch_size,
        "maps": options.maps,
        "map_format": options.map_format,
        "rounds": len(rounds),
        "images": images,
        "ms_per_image": {k: round(v, 4) for k, v in per_stage.items()},
        "forward_ms_per_batch": round(1000.0 * sum(r[1] for r in rounds) / len(rounds), 4),
        "round_ms_median": round(1000.0 * statistics.median(totals), 4),
        "response_bytes_mean": body_bytes / images,
        "limit_rps": images / sum(totals),
    }
