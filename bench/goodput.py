"""`python -m bench.goodput`: answers within their deadline per second under overload.

One server with `ATTNSERVE_REQUEST_TIMEOUT_S` = the deadline. First the saturation throughput
(closed loop at `--concurrency`), then the same model at `--overload` times that many clients:
goodput counts the 200 answers that arrived within the deadline. It prints both, their ratio,
and how the other requests ended (504 refused at collection or expired, 503 queue full).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from bench.httpclient import HttpRequest
from bench.inputs import load_inputs
from bench.loadgen import StepResult, closed_loop
from bench.server import ServerProcess

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.goodput", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits-cbam")
    p.add_argument("--random", help='serve "arch:block" with random weights, e.g. resnet50:se')
    p.add_argument("--inputs", default="digits")
    p.add_argument("--deadline", type=float, default=0.25, help="seconds (request timeout)")
    p.add_argument("--concurrency", type=int, default=16, help="clients at saturation")
    p.add_argument("--overload", type=int, default=10, help="overload = this x concurrency")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--maps", default="summary")
    p.add_argument("--out", type=Path)
    return p


async def _step(server: ServerProcess, model: str, clients: int, args: argparse.Namespace) -> dict:
    path = f"/v1/models/{model}/predict?maps={args.maps}"
    requests = [
        HttpRequest.build("POST", server.host, server.port, path, i.data, i.content_type)
        for i in load_inputs(args.inputs)
    ]
    result: StepResult = await closed_loop(
        server.host,
        server.port,
        requests,
        concurrency=clients,
        duration_s=args.duration,
        warmup_s=args.warmup,
    )
    summary = result.summary()
    in_time = sum(1 for t in result.latencies_s if t <= args.deadline)
    return {
        "clients": clients,
        "throughput_rps": summary["throughput_rps"],
        "goodput_rps": in_time / result.window_s,
        "p50_ms": summary["latency_ms"]["p50"],
        "p99_ms": summary["latency_ms"]["p99"],
        "errors": summary["errors"],
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = {"models": args.model, "request_timeout_s": str(args.deadline)}
    model = args.model
    if args.random:
        arch, _, block = args.random.partition(":")
        settings = {**settings, "models": "digits-none", "random_models": args.random}
        model = f"{arch}-{block}-random"
    with ServerProcess(settings) as server:
        saturation = asyncio.run(_step(server, model, args.concurrency, args))
        overload = asyncio.run(_step(server, model, args.concurrency * args.overload, args))
    ratio = overload["goodput_rps"] / saturation["throughput_rps"]
    print(f"model {model}, deadline {args.deadline:g}s, maps={args.maps}")
    print("| load | clients | answered/s | within deadline/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for name, row in (("saturation", saturation), (f"{args.overload}x", overload)):
        print(
            f"| {name} | {row['clients']} | {row['throughput_rps']:.1f} | "
            f"{row['goodput_rps']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
            f"{row['errors']} |"
        )
    print(f"goodput at {args.overload}x / saturation throughput: {ratio:.2f}")
    if args.out:
        rows = {"saturation": saturation, "overload": overload, "ratio": ratio}
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
