"""The in-process limit: the service's own pipeline with no HTTP, timed stage by stage.

Per image: `service.imaging.prepare` (decode + preprocess), the model's batch handler from
`service.pipeline.make_batch_handler` (stack, `ModelRunner.forward` on a `DeviceWorker` with
attention capture and the summary map, split) at a given batch size, `service.maps.build_result`
and the route's `ORJSONResponse` encoding. The stages run one after another in one process, so
the sum is the work the server must do per request, minus everything HTTP adds. The budget is
split in three parts and the fastest counts, so a burst of other load on a shared machine does
not lower the limit.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import cycle, islice
from typing import Any

import torch

from models import DataConfig
from service.api.handlers import ORJSONResponse
from service.imaging import prepare
from service.maps import MapOptions, build_result
from service.pipeline import PredictItem, make_batch_handler
from service.registry import discover
from service.settings import Settings
from service.worker import DeviceWorker, ModelRunner, resolve_device, use_one_thread

__all__ = ["InProcessPipeline", "LoadedModel", "load_model"]

STAGES = ("decode_preprocess", "forward", "build", "encode")
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

    The model is built, warmed up and run on the pipeline's own `DeviceWorker` thread with
    `threads` intra-op threads (None: torch's default), like the server's device thread.
    """

    def __init__(
        self,
        name: str,
        *,
        device: str = "cpu",
        random_models: tuple[str, ...] = (),
        threads: int | None = None,
        max_image_pixels: int = 40_000_000,
    ) -> None:
        self.max_pixels = max_image_pixels
        self._worker = DeviceWorker(resolve_device(device), threads=threads)
        self._cpu = ThreadPoolExecutor(
            1, thread_name_prefix="inprocess-cpu", initializer=use_one_thread
        )
        self._loop = asyncio.new_event_loop()
        load = self._worker.run(load_model, name, device=device, random_models=random_models)
        self.model: LoadedModel = self._loop.run_until_complete(load)
        self.threads = self._loop.run_until_complete(self._worker.run(torch.get_num_threads))
        self._handler = make_batch_handler(self._worker, self.model.runner)

    def close(self) -> None:
        """Stop the device thread and close the private event loop."""
        self._cpu.shutdown()
        self._loop.close()
        self._worker.close()

    def _round(self, images: list[bytes], options: MapOptions) -> tuple[list[float], int]:
        """One batch through every stage: seconds per stage and the encoded bytes."""
        config = self.model.data_config
        t0 = time.perf_counter()
        prepared = [prepare(d, [config], max_pixels=self.max_pixels)[0] for d in images]
        t1 = time.perf_counter()
        capture = options.maps != "none"
        items = [PredictItem(p.tensor, capture) for p in prepared]
        outputs = self._loop.run_until_complete(self._handler(items))
        t2 = time.perf_counter()
        results = [
            build_result(o.probs, o.records, o.summary, p.geometry, config.labels, options)
            for o, p in zip(outputs, prepared, strict=True)
        ]
        t3 = time.perf_counter()
        bodies = [ORJSONResponse({"model": self.model.name, "results": [r]}).body for r in results]
        t4 = time.perf_counter()
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3], sum(len(b) for b in bodies)

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
        in `repeats` parts; the fastest part is the limit (the others were slowed by something
        else on the machine), and every part's rate is kept as `repeat_rps`.

        The CPU stages run on a thread set up like the server's CPU pool (one intra-op
        thread), so that the device thread's OpenMP team is the only one, as in the server."""
        job = self._cpu.submit(
            self._measure, images, batch_size, options, budget_s, repeats, min_rounds
        )
        return job.result()

    def _measure(
        self,
        images: list[bytes],
        batch_size: int,
        options: MapOptions,
        budget_s: float,
        repeats: int,
        min_rounds: int,
    ) -> dict[str, Any]:
        batch_size = max(1, batch_size)
        source = cycle(images)
        self._round(list(islice(source, batch_size)), options)
        parts = [
            self._timed(source, batch_size, options, budget_s / repeats, min_rounds)
            for _ in range(max(1, repeats))
        ]
        best = max(parts, key=lambda part: part["limit_rps"])
        best["repeat_rps"] = [round(part["limit_rps"], 2) for part in parts]
        return best

    def _timed(
        self,
        source: Iterator[bytes],
        batch_size: int,
        options: MapOptions,
        budget_s: float,
        min_rounds: int,
    ) -> dict[str, Any]:
        """Rounds for `budget_s` seconds (at least `min_rounds`), summarised with CPU time."""
        rounds: list[list[float]] = []
        body_bytes = 0
        cpu_start = time.process_time()
        deadline = time.perf_counter() + budget_s
        while len(rounds) < MAX_ROUNDS and (
            len(rounds) < min_rounds or time.perf_counter() < deadline
        ):
            stages, size = self._round(list(islice(source, batch_size)), options)
            rounds.append(stages)
            body_bytes += size
        summary = _summarise(rounds, batch_size, body_bytes, options)
        summary["torch_threads"] = self.threads
        cpu_ms = 1000.0 * (time.process_time() - cpu_start) / summary["images"]
        summary["cpu_ms_per_image"] = round(cpu_ms, 4)
        return summary


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
