"""`python -m bench.gil [MODEL]`: a batch-32 forward with attention capture, eager vs
TorchScript trace, with and without another thread holding the GIL (what the event loop does
in a busy server).

Prints the median milliseconds per forward of each of the four cases. It shows why the
service runs CPU models as traces (service/graph.py): the eager forward needs the GIL between
ops, the trace (softmax and summary map included) does not. The forward runs on a device
thread with one intra-op thread, so on a 2-core machine it and the GIL-busy thread each have a
core and only the GIL is shared.

Then the other thing that holds the GIL for long: a full garbage collection with the model
and the web stack loaded, before and after `service.worker.settle_gc` (what the service does
once its models are loaded).
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
import threading
import time

import torch

from bench.inprocess import load_model
from service.settings import Settings
from service.worker import DeviceWorker, ModelRunner, settle_gc

BATCH = 32
ROUNDS = 15


def _median_ms(runner: ModelRunner, batch: torch.Tensor) -> float:
    runner.forward(batch, True)
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        runner.forward(batch, True)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _measure(name: str) -> dict[str, float]:
    loaded = load_model(name)
    model = loaded.runner.model
    device = torch.device("cpu")
    runners = {
        "eager": ModelRunner(name, model, device=device),
        "traced": ModelRunner(name, model, device=device, trace=True),
    }
    batch = torch.rand((BATCH, *loaded.data_config.input_size))
    results = {f"{k} alone": _median_ms(r, batch) for k, r in runners.items()}
    stop = threading.Event()

    def hold_gil() -> None:  # pure Python work, like request parsing on the event loop
        while not stop.is_set():
            sum(range(500))

    holder = threading.Thread(target=hold_gil)
    holder.start()
    try:
        results |= {f"{k} + GIL-busy thread": _median_ms(r, batch) for k, r in runners.items()}
    finally:
        stop.set()
        holder.join()
    return results


def _full_collection_ms() -> tuple[int, float, float]:
    """(objects tracked, ms of a full collection, ms of one after settle_gc); the app module
    is imported so that the web stack's objects are there, as in the server."""
    import service.app  # noqa: F401

    def timed() -> float:
        start = time.perf_counter()
        gc.collect()
        return 1000.0 * (time.perf_counter() - start)

    gc.collect()
    tracked = len(gc.get_objects())
    before = statistics.median(timed() for _ in range(5))
    settle_gc(Settings(models=[]).gc_threshold)
    after = statistics.median(timed() for _ in range(5))
    return tracked, before, after


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "digits-cbam"
    # The forward runs on a device thread, as served (one intra-op thread: see the docstring).
    worker = DeviceWorker(torch.device("cpu"), threads=1)
    try:
        results = asyncio.run(worker.run(_measure, name))
        loaded = asyncio.run(worker.run(load_model, name))  # alive during the collections
        tracked, before, after = _full_collection_ms()
    finally:
        worker.close()
    for case, ms in results.items():
        print(f"{name} batch {BATCH} {case:>24}: {ms:7.1f} ms")
    print(f"full garbage collection, {tracked} objects tracked: {before:.1f} ms; after settle_gc"
          f" (start-up objects frozen): {after:.2f} ms")  # fmt: skip
    del loaded


if __name__ == "__main__":
    main()
