"""`python -m bench.ab A B`: two checkouts of attnserve served in interleaved rounds, side by side.

Each round starts the server of A, then of B (the order alternates between rounds), drives each
with the same closed-loop steps (every model at each concurrency, maps=summary, digit images)
and stops it. It prints, per step, each side's median throughput and p99 over the rounds, the
round-to-round spread (the range of A's own rounds, relative to its median), the server's CPU
per answered request, and B/A, and writes the rows as JSON. A difference inside the spread is
no difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path
from typing import Any

from bench.httpclient import HttpRequest
from bench.inputs import load_inputs
from bench.loadgen import closed_loop
from bench.server import ServerProcess

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path, help="checkout A (e.g. the commit before a change)")
    p.add_argument("b", type=Path, help="checkout B")
    p.add_argument("--models", default="digits-cbam,digits-se,digits-coordatt")
    p.add_argument(
        "--random", help='serve "arch:block" with random weights instead, e.g. resnet50:se'
    )
    p.add_argument("--inputs", default="digits", help="input set (bench.inputs), e.g. photos-jpeg")
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per step")
    p.add_argument("--warmup", type=float, default=1.0)
    for side in ("a", "b"):
        p.add_argument(
            f"--env-{side}",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"extra environment of {side.upper()}'s server (e.g. an ATTNSERVE_ setting)",
        )
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    return p


async def _step(server: ServerProcess, model: str, concurrency: int, args: Any) -> dict:
    requests = [
        HttpRequest.build(
            "POST", server.host, server.port, f"/v1/models/{model}/predict", i.data, i.content_type
        )
        for i in load_inputs(args.inputs)
    ]

    async def probe() -> dict[str, float]:
        return {"cpu": server.cpu_seconds()}

    result = await closed_loop(
        server.host,
        server.port,
        requests,
        concurrency=concurrency,
        duration_s=args.duration,
        warmup_s=args.warmup,
        probe=probe,
    )
    summary = result.summary()
    cpu = result.probes[-1]["cpu"] - result.probes[0]["cpu"]
    return {
        "cpu_ms": 1000.0 * cpu / max(1, result.ok),
        "rps": summary["throughput_rps"],
        "p50": summary["latency_ms"]["p50"],
        "p99": summary["latency_ms"]["p99"],
        "errors": summary["error_count"],
    }


def _serve(root: Path, env: list[str], models: list[str], args: Any) -> dict[tuple[str, int], dict]:
    """One round of one side: a fresh server from `root`, every step, then stop."""
    settings = {"models": ",".join(models)}
    if args.random:
        settings = {"models": "digits-none", "random_models": args.random}
    extra = dict(item.partition("=")[::2] for item in env)
    with ServerProcess(settings, root=root, extra_env=extra) as server:
        return {
            (model, c): asyncio.run(_step(server, model, c, args))
            for model in models
            for c in args.concurrencies
        }


def _spread(values: list[float]) -> float:
    """The range of a side's rounds relative to their median."""
    median = statistics.median(values)
    return (max(values) - min(values)) / median if median else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if args.random:
        arch, _, block = args.random.partition(":")
        models = [f"{arch}-{block}-random"]
    args.concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for round_index in range(args.rounds):
        order = ("A", "B") if round_index % 2 == 0 else ("B", "A")
        for side in order:
            root, env = (args.a, args.env_a) if side == "A" else (args.b, args.env_b)
            runs[side].append(_serve(root.resolve(), env, models, args))
            print(f"round {round_index + 1}/{args.rounds}: {side} done", flush=True)
    rows = []
    for model in models:
        for c in args.concurrencies:
            a = [r[(model, c)] for r in runs["A"]]
            b = [r[(model, c)] for r in runs["B"]]
            row = {"model": model, "concurrency": c}
            for key in ("rps", "p99", "cpu_ms"):
                row[f"A_{key}"] = [round(x[key], 2) for x in a]
                row[f"B_{key}"] = [round(x[key], 2) for x in b]
                med_a = statistics.median(x[key] for x in a)
                med_b = statistics.median(x[key] for x in b)
                row[f"{key}_ratio"] = round(med_b / med_a, 3) if med_a else None
                row[f"{key}_spread_A"] = round(_spread([x[key] for x in a]), 3)
            row["errors"] = sum(x["errors"] for x in a + b)
            rows.append(row)
    print(
        "| model | c | A req/s | B req/s | B/A | spread A | A p99 ms | B p99 ms | B/A "
        "| spread A | A CPU ms/req | B CPU ms/req | B/A | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    med = statistics.median
    for r in rows:
        print(
            f"| {r['model']} | {r['concurrency']} | {med(r['A_rps']):.1f} | {med(r['B_rps']):.1f} "
            f"| {r['rps_ratio']} | {r['rps_spread_A']} | {med(r['A_p99']):.1f} "
            f"| {med(r['B_p99']):.1f} | {r['p99_ratio']} | {r['p99_spread_A']} "
            f"| {med(r['A_cpu_ms']):.2f} | {med(r['B_cpu_ms']):.2f} | {r['cpu_ms_ratio']} "
            f"| {r['errors']} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
