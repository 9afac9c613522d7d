"""`python -m bench.probes.clientcost`: client CPU per request of bench.loadgen's raw asyncio
client against httpx.AsyncClient, on the same server and load (why the benchmark has its own
client: it shares the cores with the server).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import httpx

from bench.httpclient import HttpRequest
from bench.inputs import load_inputs
from bench.loadgen import closed_loop
from bench.server import ServerProcess
from bench.session import loop_factory

__all__ = ["main"]

PATH = "/v1/models/{model}/predict?maps=summary"


async def _raw(server: ServerProcess, path: str, concurrency: int, seconds: float) -> int:
    images = load_inputs("digits")  # cached: loaded before the CPU clock starts
    requests = [
        HttpRequest.build("POST", server.host, server.port, path, i.data, i.content_type)
        for i in images
    ]
    result = await closed_loop(
        server.host, server.port, requests, concurrency=concurrency, duration_s=seconds, warmup_s=0
    )
    return result.ok


async def _httpx(server: ServerProcess, path: str, concurrency: int, seconds: float) -> int:
    images = load_inputs("digits")  # cached: loaded before the CPU clock starts
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    done = 0
    end = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=30) as client:

        async def worker(offset: int) -> None:
            nonlocal done
            while time.perf_counter() < end:
                image = images[(offset + done) % len(images)]
                headers = {"content-type": image.content_type}
                response = await client.post(path, content=image.data, headers=headers)
                done += response.status_code == 200

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done


def measure(
    name: str,
    client: Callable[[ServerProcess, str, int, float], Awaitable[int]],
    server: ServerProcess,
    path: str,
    args: argparse.Namespace,
) -> str:
    """One client for `args.seconds`: requests, client CPU ms per request and cores used."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        cpu = time.process_time()
        count = runner.run(client(server, path, args.concurrency, args.seconds))
        cpu = time.process_time() - cpu
    per_request = 1000 * cpu / max(1, count)
    return (
        f"{name:8} {count:6d} requests  client CPU {per_request:.3f} ms/request  "
        f"{cpu / args.seconds:.3f} cores"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Start a server, then time raw, httpx and raw again against it."""
    parser = argparse.ArgumentParser(prog="python -m bench.probes.clientcost", description=__doc__)
    parser.add_argument("--model", default="digits-cbam")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--torch-threads", type=int, default=1, help="server's OMP_NUM_THREADS")
    args = parser.parse_args(argv)
    load_inputs("digits")
    env = {"OMP_NUM_THREADS": str(args.torch_threads)}
    with ServerProcess({"models": args.model}, extra_env=env) as server:
        path = PATH.format(model=args.model)
        for name, client in (("raw", _raw), ("httpx", _httpx), ("raw", _raw)):
            print(measure(name, client, server, path, args), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
