"""gRPC beside HTTP: the same binary tensor request through `tritonclient.grpc` (raw contents)
and `tritonclient.http` (binary tensor data) against one server process, at concurrency 1 and
at saturation. Prints per protocol: latency (c=1), throughput (c=N) and server CPU per request.

    .venv/bin/python -m bench.probes.grpc_http [--model digits-cbam] [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio

from bench.server import ServerProcess, free_port


def _inputs(module: Any, batch: np.ndarray) -> tuple[list[Any], list[Any]]:
    tensor = module.InferInput("input", list(batch.shape), "FP32")
    if module in (httpclient, httpaio):
        tensor.set_data_from_numpy(batch, binary_data=True)
        outputs = [module.InferRequestedOutput("probabilities", binary_data=True)]
    else:
        tensor.set_data_from_numpy(batch)
        outputs = [module.InferRequestedOutput("probabilities")]
    return [tensor], outputs


def sequential(client: Any, module: Any, model: str, batch: np.ndarray, n: int) -> list[float]:
    inputs, outputs = _inputs(module, batch)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        client.infer(model, inputs, outputs=outputs)
        times.append(time.perf_counter() - started)
    return times


async def saturate(
    client: Any, module: Any, model: str, batch: np.ndarray, n: int, concurrency: int
) -> float:
    inputs, outputs = _inputs(module, batch)
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await client.infer(model, inputs, outputs=outputs)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-cbam")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    grpc_port = free_port()
    settings = {"models": args.model, "grpc_port": str(grpc_port)}
    batch = np.random.default_rng(0).standard_normal((1, 1, 64, 64)).astype(np.float32)
    with ServerProcess(settings) as server:
        http_address = server.base_url.removeprefix("http://")
        grpc_address = f"127.0.0.1:{grpc_port}"
        sync = {
            "http": (httpclient.InferenceServerClient(http_address), httpclient),
            "grpc": (grpcclient.InferenceServerClient(grpc_address), grpcclient),
        }
        for client, module in sync.values():  # warm both paths
            sequential(client, module, args.model, batch, 20)
        print(f"model {args.model}, input FP32 {list(batch.shape)}, output probabilities")
        print("protocol  c=1 median ms  c=1 CPU ms/req  c=N req/s  c=N CPU ms/req")
        for name, (client, module) in sync.items():
            cpu = server.cpu_seconds()
            times = sequential(client, module, args.model, batch, args.requests)
            cpu_one = (server.cpu_seconds() - cpu) / args.requests * 1000
            aio_module = httpaio if name == "http" else grpcaio
            address = http_address if name == "http" else grpc_address

            async def run(aio: Any = aio_module, url: str = address) -> float:
                client = aio.InferenceServerClient(url)
                try:
                    return await saturate(
                        client, aio, args.model, batch, args.requests * 4, args.concurrency
                    )
                finally:
                    await client.close()

            cpu = server.cpu_seconds()
            rate = asyncio.run(run())
            cpu_many = (server.cpu_seconds() - cpu) / (args.requests * 4) * 1000
            median = statistics.median(times) * 1000
            print(
                f"{name:8}  {median:13.2f}  {cpu_one:14.2f}  {rate:9.1f}  {cpu_many:14.2f}"
                f"   (c=N is {args.concurrency})"
            )


if __name__ == "__main__":
    main()
