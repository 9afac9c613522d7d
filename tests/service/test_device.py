"""Device worker and model runner with a real small model: shapes, equivalence, OOM splitting."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from models import create_model
from service.device import DeviceWorker, default_instances, resolve_device
from service.errors import NotReady
from service.runner import BatchOutput, ModelRunner, cpu_has_bf16, host_copy

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
    with caplog.at_level(logging.WARNING, logger="service.runner"):
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
    if cpu_has_bf16():  # elsewhere bf16 is refused (tests/service/test_runner_precision.py)
        bf16 = ModelRunner("d", digits_model(), device=CPU, autocast="bf16").forward(
            images(4), True
        )
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


async def test_device_threads_get_their_intra_op_threads() -> None:
    """A device thread keeps the count it was given, whatever other threads set."""
    default = torch.get_num_threads()
    with ThreadPoolExecutor(1) as other:
        other.submit(torch.set_num_threads, 1).result()
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
        with caplog.at_level(logging.WARNING, logger="service.runner"):
            out = runner.forward(x, capture=True)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert "out of memory" in caplog.text
    assert torch.allclose(out.probs, want.probs, atol=1e-4)
    assert out.summary is not None and out.summary.shape == (256, 64, 64)
