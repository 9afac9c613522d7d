"""Device worker and model runner with a real small model: shapes, equivalence, OOM splitting."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from models import create_model
from service.errors import NotReady
from service.worker import (
    BatchOutput,
    DeviceWorker,
    ModelRunner,
    default_instances,
    host_copy,
    resolve_device,
    use_batch_scheduling,
    use_one_thread,
)

CPU = torch.device("cpu")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def digits_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet_small", attention="cbam", num_classes=10, in_chans=1).eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, 1, 64, 64), generator=torch.Generator().manual_seed(seed))


class FakeOOM(nn.Module):
    """Wraps a model and raises CUDA out-of-memory for batches above `limit`; logs batch sizes."""

    def __init__(self, inner: nn.Module, limit: int) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.data_config = inner.data_config
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(x.shape[0]))
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"fake: batch {x.shape[0]} > {self.limit}")
        return self.inner(x)


def assert_outputs_close(a: BatchOutput, b: BatchOutput, atol: float = 1e-5) -> None:
    assert torch.allclose(a.probs, b.probs, atol=atol)
    assert [(r.site, r.kind) for r in a.records] == [(r.site, r.kind) for r in b.records]
    for ra, rb in zip(a.records, b.records, strict=True):
        assert torch.allclose(ra.tensor, rb.tensor, atol=atol), ra.site
    assert (a.summary is None) == (b.summary is None)
    if a.summary is not None:
        assert torch.allclose(a.summary, b.summary, atol=atol)


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner("digits", digits_model(), device=CPU)


@pytest.fixture(scope="module")
def reference(runner: ModelRunner) -> BatchOutput:
    return runner.forward(images(4), capture=True)


def test_forward_shapes_and_probabilities(reference: BatchOutput) -> None:
    out = reference
    assert out.probs.shape == (4, 10) and out.probs.dtype == torch.float32
    assert torch.allclose(out.probs.sum(dim=1), torch.ones(4), atol=1e-5)
    assert out.summary is not None and out.summary.shape == (4, 64, 64)
    assert out.summary.min() >= 0 and out.summary.max() <= 1
    assert out.records and {r.block for r in out.records} == {"cbam"}
    assert {"channel", "spatial"} <= {r.kind for r in out.records}
    for record in out.records:
        assert record.tensor.device == CPU and record.tensor.dtype == torch.float32
        assert record.tensor.shape[0] == 4


def test_capture_does_not_change_probabilities(runner: ModelRunner, reference: BatchOutput) -> None:
    plain = runner.forward(images(4), capture=False)
    assert torch.equal(plain.probs, reference.probs)
    assert plain.records == [] and plain.summary is None


def test_batched_results_equal_single_results(runner: ModelRunner, reference: BatchOutput) -> None:
    x = images(4)
    for i in range(4):
        single = runner.forward(x[i : i + 1], capture=True)
        row = BatchOutput(
            reference.probs[i : i + 1],
            [dataclasses.replace(r, tensor=r.tensor[i : i + 1]) for r in reference.records],
            None if reference.summary is None else reference.summary[i : i + 1],
        )
        assert_outputs_close(single, row)


def test_out_of_memory_splits_batch_in_halves(
    reference: BatchOutput, caplog: pytest.LogCaptureFixture
) -> None:
    wrapped = FakeOOM(digits_model(), limit=1)
    runner = ModelRunner("digits", wrapped, device=CPU)
    with caplog.at_level(logging.WARNING, logger="service.worker"):
        out = runner.forward(images(4), capture=True)
    assert wrapped.sizes == [4, 2, 1, 1, 2, 1, 1]
    assert "splitting into 2 + 2" in caplog.text
    assert [r.site for r in out.records] == [f"inner.{r.site}" for r in reference.records]
    assert torch.allclose(out.probs, reference.probs, atol=1e-5)
    assert out.summary is not None and reference.summary is not None
    assert torch.allclose(out.summary, reference.summary, atol=1e-5)
    for got, want in zip(out.records, reference.records, strict=True):
        assert torch.allclose(got.tensor, want.tensor, atol=1e-5)


def test_out_of_memory_on_odd_batch_and_single_item() -> None:
    wrapped = FakeOOM(digits_model(), limit=2)
    out = ModelRunner("digits", wrapped, device=CPU).forward(images(5), capture=False)
    assert wrapped.sizes == [5, 3, 2, 1, 2]
    assert out.probs.shape == (5, 10)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        ModelRunner("d", FakeOOM(digits_model(), limit=0), device=CPU).forward(images(1), False)


def test_warmup_runs_each_batch_size() -> None:
    wrapped = FakeOOM(digits_model(), limit=64)
    ModelRunner("digits", wrapped, device=CPU).warmup([1, 3])
    assert wrapped.sizes == [1, 3]


def test_rejects_bad_input_and_settings() -> None:
    with pytest.raises(ValueError, match="fp16"):
        ModelRunner("d", digits_model(), device=CPU, autocast="fp16")
    with pytest.raises(ValueError, match="autocast"):
        ModelRunner("d", digits_model(), device=CPU, autocast="fp8")
    with pytest.raises(ValueError, match="N, C, H, W"):
        ModelRunner("d", digits_model(), device=CPU).forward(torch.rand(1, 64, 64), True)


def test_bf16_autocast_and_channels_last_on_cpu(reference: BatchOutput) -> None:
    bf16 = ModelRunner("d", digits_model(), device=CPU, autocast="bf16").forward(images(4), True)
    assert bf16.probs.dtype == torch.float32
    assert torch.allclose(bf16.probs.sum(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(bf16.probs, reference.probs, atol=0.05)
    assert all(r.tensor.dtype == torch.float32 for r in bf16.records)
    cl = ModelRunner("d", digits_model(), device=CPU, channels_last=True).forward(images(4), True)
    assert_outputs_close(cl, reference)


def test_host_copy_round_trips_shapes_and_values() -> None:
    tensors = [
        torch.rand(3, 10),
        torch.rand(3, 8, 5, 5).contiguous(memory_format=torch.channels_last),
        torch.rand(4, 3).t(),
        torch.rand(3, 1, 1, 7, dtype=torch.float64),
    ]
    copied = host_copy(tensors)
    assert [c.shape for c in copied] == [t.shape for t in tensors]
    assert all(c.dtype == torch.float32 and c.device == CPU for c in copied)
    assert all(torch.equal(c, t.float()) for c, t in zip(copied, tensors, strict=True))


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="valid"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="Hint"):
            resolve_device("cuda:0")


async def test_device_worker_uses_one_dedicated_thread(runner: ModelRunner) -> None:
    worker = DeviceWorker(CPU)
    try:
        ids = await asyncio.gather(*(worker.run(threading.get_ident) for _ in range(5)))
        assert len(set(ids)) == 1 and ids[0] != threading.get_ident()
        assert await worker.check() is True
        assert worker.memory_bytes() == {}
        outs = await asyncio.gather(
            worker.run(runner.forward, images(2), capture=True),
            worker.run(runner.forward, images(2), capture=False),
        )
        assert torch.equal(outs[0].probs, outs[1].probs)
        with pytest.raises(ZeroDivisionError):
            await worker.run(lambda: 1 / 0)
        assert await worker.run(threading.get_ident) == ids[0]
    finally:
        worker.close()
    with pytest.raises(NotReady):
        await worker.run(threading.get_ident)


async def test_pending_counts_calls_waiting_for_a_device_thread() -> None:
    worker = DeviceWorker(CPU)
    gate = threading.Event()
    try:
        busy = asyncio.create_task(worker.run(gate.wait, 5.0))
        await asyncio.sleep(0.05)
        assert worker.pending == 0  # the running call is not waiting
        waiting = [asyncio.create_task(worker.run(threading.get_ident)) for _ in range(2)]
        dropped = asyncio.create_task(worker.run(threading.get_ident))
        await asyncio.sleep(0.05)
        assert worker.pending == 3
        dropped.cancel()  # cancelled before a thread took it: no longer waiting
        await asyncio.sleep(0.05)
        assert worker.pending == 2
        gate.set()
        assert await busy is True
        await asyncio.gather(*waiting)
        assert worker.pending == 0
    finally:
        gate.set()
        worker.close()


async def test_only_the_device_thread_has_intra_op_threads() -> None:
    """The CPU pool runs torch single-threaded; the device thread keeps its own count, even
    when it starts after a pool thread changed the count that new threads inherit."""
    default = torch.get_num_threads()
    with ThreadPoolExecutor(2, initializer=use_one_thread) as pool:
        assert set(pool.map(lambda _: torch.get_num_threads(), range(4))) == {1}
        worker, pinned = DeviceWorker(CPU), DeviceWorker(CPU, threads=3)
        try:
            assert worker.threads == default
            assert await worker.run(torch.get_num_threads) == default
            assert await pinned.run(torch.get_num_threads) == 3
        finally:
            worker.close()
            pinned.close()
    assert torch.get_num_threads() == default  # the calling thread is left alone


async def test_instances_run_batches_side_by_side(runner: ModelRunner) -> None:
    """Two instances: two device threads, each with its share of the intra-op threads, running
    two calls at the same time; eager forwards of one model still give their own records."""
    worker = DeviceWorker(CPU, threads=1, instances=2)
    both = threading.Barrier(2, timeout=5)

    def meet() -> tuple[int, int]:
        both.wait()  # returns only when the other call runs at the same time
        return threading.get_ident(), torch.get_num_threads()

    try:
        first, second = await asyncio.gather(worker.run(meet), worker.run(meet))
        assert first[0] != second[0] and first[1] == second[1] == 1
        batches = [images(3, seed=s) for s in range(6)]
        outs = await asyncio.gather(
            *(worker.run(runner.forward, b, capture=i % 2 == 0) for i, b in enumerate(batches))
        )
        for i, (batch, out) in enumerate(zip(batches, outs, strict=True)):
            assert_outputs_close(out, runner.forward(batch, capture=i % 2 == 0))
    finally:
        worker.close()
    default = torch.get_num_threads()
    split = DeviceWorker(CPU, instances=2)
    try:
        assert split.threads == max(1, default // 2)
    finally:
        split.close()
    with pytest.raises(ValueError, match="instances"):
        DeviceWorker(CPU, instances=0)


def test_default_instances() -> None:
    assert default_instances(CPU) == (2 if torch.get_num_threads() >= 2 else 1)
    assert default_instances(torch.device("cuda", 0)) == 1


@pytest.mark.gpu
@gpu
def test_cuda_matches_cpu(reference: BatchOutput) -> None:
    runner = ModelRunner("d", digits_model(), device=resolve_device("cuda"))
    out = runner.forward(images(4), capture=True)
    assert out.probs.device == CPU and all(r.tensor.device == CPU for r in out.records)
    assert out.summary is not None and out.summary.device == CPU
    assert_outputs_close(out, reference, atol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("autocast", ["fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_autocast_and_channels_last(
    reference: BatchOutput, autocast: str, channels_last: bool
) -> None:
    device = resolve_device("cuda")
    runner = ModelRunner(
        "d", digits_model(), device=device, autocast=autocast, channels_last=channels_last
    )
    runner.warmup([1, 4])
    out = runner.forward(images(4), capture=True)
    assert out.probs.dtype == torch.float32 and out.probs.device == CPU
    assert torch.allclose(out.probs.sum(dim=1), torch.ones(4), atol=1e-4)
    assert torch.allclose(out.probs, reference.probs, atol=0.05)
    assert all(r.tensor.dtype == torch.float32 and r.tensor.device == CPU for r in out.records)
    assert set(DeviceWorker(device).memory_bytes()) == {"allocated", "reserved"}


@pytest.mark.gpu
@gpu
def test_real_cuda_out_of_memory_splits(caplog: pytest.LogCaptureFixture) -> None:
    device = resolve_device("cuda")
    runner = ModelRunner("d", digits_model(), device=device)
    x = images(256)
    chunks = [runner.forward(x[i : i + 16], capture=True) for i in range(0, 256, 16)]
    want = BatchOutput(torch.cat([c.probs for c in chunks]), [], None)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    runner.forward(x[:16], capture=True)
    per_16 = torch.cuda.max_memory_allocated(device) - base
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction((base + 6 * per_16) / total, device)
    try:
        with caplog.at_level(logging.WARNING, logger="service.worker"):
            out = runner.forward(x, capture=True)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert "out of memory" in caplog.text
    assert torch.allclose(out.probs, want.probs, atol=1e-4)
    assert out.summary is not None and out.summary.shape == (256, 64, 64)


_FAULTS_SCRIPT = """
import resource, sys, torch
from models import create_model
from service.worker import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
torch.manual_seed(0)
model = create_model("resnet_small", attention="cbam", num_classes=10, in_chans=1).eval()
x = torch.rand(13, 1, 64, 64)
with torch.inference_mode():
    model(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        model(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_stops_page_faults_on_every_batch() -> None:
    """20 forwards of a digits-sized model at batch 13: with glibc's defaults the activation
    buffers are faulted in anew on every pass (about 60,000 faults here); kept, they are
    reused (under 1,000). A fresh process for each, since the setting is process-wide."""

    def faults(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        return int(done.stdout.strip())

    default, tuned = faults("default"), faults("tuned")
    assert default > 10_000
    assert tuned < default / 10


_GC_SCRIPT = """
import gc, sys
from service.worker import settle_gc
kept = [[i] for i in range(200_000)]  # objects that live as long as the process
if sys.argv[1] == "settled":
    settle_gc(10_000)
before = [stats["collections"] for stats in gc.get_stats()]
for _ in range(100_000):  # request-like churn: short-lived reference cycles
    node = {}
    node["self"] = node
gc.collect(1)  # a young collection, as the service triggers between requests
after = [stats["collections"] for stats in gc.get_stats()]
print(gc.get_freeze_count(), len(gc.get_objects(2)), *(a - b for a, b in zip(after, before)))
"""


def test_settle_gc_freezes_start_up_objects_and_spaces_out_collections() -> None:
    """200,000 long-lived containers, then 100,000 short-lived cycles. Settled, the
    long-lived ones are frozen (no collection walks them again) and the churn starts about
    ten young-generation collections instead of about 140. A fresh process for each run,
    since the setting is process-wide."""

    def run(mode: str) -> list[int]:
        done = subprocess.run(
            [sys.executable, "-c", _GC_SCRIPT, mode], capture_output=True, text=True, check=True
        )
        return [int(word) for word in done.stdout.split()]

    frozen, oldest, *collections = run("default")
    assert frozen == 0 and oldest >= 200_000
    assert collections[0] > 100
    frozen, oldest, *collections = run("settled")
    assert frozen >= 200_000 and oldest < 1_000
    assert collections[0] <= 12


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_batch_scheduling_applies_to_the_calling_thread_only() -> None:
    seen: list[tuple[bool, int]] = []

    def pool_thread() -> None:
        seen.append((use_batch_scheduling(), os.sched_getscheduler(0)))

    thread = threading.Thread(target=pool_thread)
    thread.start()
    thread.join()
    assert seen == [(True, os.SCHED_BATCH)]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
