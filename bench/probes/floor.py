"""`python -m bench.probes.floor`: the event loop's CPU per request of the bare HTTP stack.

Runs uvicorn as the service does (uvloop, httptools) with a raw ASGI app that waits
`--delay-ms` and answers a fixed body the size of a digits `maps=summary` answer, while
`--burners` threads keep cores busy with GIL-free torch matrix products; the event loop's CPU
per answered request is the web server's share of the service's per-request cost. Linux only.

    .venv/bin/python -m bench.probes.floor --concurrency 64 --duration 8
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from bench.httpclient import HttpRequest
from bench.inputs import load_inputs
from bench.loadgen import closed_loop
from bench.probes.threads import sample_threads
from bench.server import REPO_ROOT, free_port

__all__ = ["main"]

BODY_BYTES = 5040  # the size of a digits answer with maps=summary
PR_SET_NAME = 15


def _name_os_thread() -> None:
    """Give the calling OS thread its Python thread name (first 15 bytes), as /proc shows it."""
    name = threading.current_thread().name.encode()[:15]
    ctypes.CDLL(None).prctl(PR_SET_NAME, name, 0, 0, 0)


def _serve(port: int, delay_s: float, burners: int) -> None:
    """The server process: burner threads, then uvicorn with the raw app until killed."""
    import torch
    import uvicorn

    torch.set_num_threads(1)
    body = b'{"pad":"' + b"0" * (BODY_BYTES - 10) + b'"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]

    def burn() -> None:
        _name_os_thread()  # "burner-N" in /proc, for the CPU count below
        a = torch.randn(256, 256)
        while True:
            torch.mm(a, a)

    for i in range(burners):
        threading.Thread(target=burn, name=f"burner-{i}", daemon=True).start()

    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await asyncio.sleep(delay_s)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the floor server exited with status {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise RuntimeError("the floor server did not answer in time")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.probes.floor", description=__doc__.split("\n")[0]
    )
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--delay-ms", type=float, default=70.0, help="wait before each answer")
    p.add_argument("--burners", type=int, default=2, help="GIL-free busy threads in the server")
    p.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.serve is not None:
        _serve(args.serve, args.delay_ms / 1000.0, args.burners)
        return
    port = free_port("127.0.0.1")
    command = [sys.executable, "-m", "bench.probes.floor", "--serve", str(port),
               "--delay-ms", str(args.delay_ms), "--burners", str(args.burners)]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO_ROOT)
    try:
        _wait_ready(port, proc)
        requests = [
            HttpRequest.build("POST", "127.0.0.1", port, "/predict", i.data, i.content_type)
            for i in load_inputs("digits")
        ]

        def step(seconds: float):  # type: ignore[no-untyped-def]
            load = closed_loop("127.0.0.1", port, requests, concurrency=args.concurrency,
                               duration_s=seconds, warmup_s=0.0)  # fmt: skip
            return asyncio.run(load)

        step(args.warmup)
        before, started = sample_threads(proc.pid), time.perf_counter()
        result = step(args.duration)
        wall = time.perf_counter() - started
        after = sample_threads(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    answered = max(result.ok, 1)
    loop_cpu = after[proc.pid].cpu_s - before[proc.pid].cpu_s  # the main thread runs the loop
    burners = sum(
        end.cpu_s - before[tid].cpu_s
        for tid, end in after.items()
        if end.name.startswith("burner") and tid in before
    )
    rate = result.ok / args.duration
    print(f"floor c={args.concurrency} delay {args.delay_ms:g} ms, {args.burners} burners: "
          f"{rate:.1f} req/s, {result.ok} answered, wall {wall:.1f} s")  # fmt: skip
    print(f"event loop: {loop_cpu / wall:.3f} cores, {1000 * loop_cpu / answered:.3f} ms/req; "
          f"burners: {burners / wall:.3f} cores")  # fmt: skip


if __name__ == "__main__":
    main()
