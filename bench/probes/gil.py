"""`python -m bench.probes.gil [MODEL]`: median milliseconds of a batch-32 forward with attention
capture, eager against TorchScript trace, alone and beside a thread that holds the GIL.

It shows why CPU models run as traces: the eager forward needs the GIL between ops, the trace
does not. The forward runs on a device thread with one intra-op thread, so on a 2-core machine
it and the GIL-busy thread each have a core and only the GIL is shared.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time

import torch

from service.device import DeviceWorker
from service.repository import discover
from service.runner import ModelRunner
from service.settings import Settings

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


def _build(name: str) -> torch.nn.Module:
    """Model `name` as the server would host it (zoo package, or random weights)."""
    sources = {source.name: source for source in discover(Settings(models=[]))}
    if name not in sources:
        raise SystemExit(f"no model {name!r}; available: {sorted(sources)}")
    return sources[name].build()


def _measure(name: str) -> dict[str, float]:
    model = _build(name)
    device = torch.device("cpu")
    runners = {
        "eager": ModelRunner(name, model, device=device),
        "traced": ModelRunner(name, model, device=device, trace=True),
    }
    batch = torch.rand((BATCH, *model.data_config.input_size))
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


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "digits-cbam"
    # The forward runs on a device thread, as served (one intra-op thread: see the docstring).
    worker = DeviceWorker(torch.device("cpu"), threads=1)
    try:
        results = asyncio.run(worker.run(_measure, name))
    finally:
        worker.close()
    for case, ms in results.items():
        print(f"{name} batch {BATCH} {case:>24}: {ms:7.1f} ms")


if __name__ == "__main__":
    main()
