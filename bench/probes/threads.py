"""`python -m bench.probes.threads`: where the server's CPU goes, thread by thread, under load.

Starts the real server (one model), drives it with the closed-loop client for a warm-up and a
measured step, and prints for each server thread what Linux accounted to it during the step
(`/proc/<pid>/task/<tid>/{stat,schedstat,status}`: cores, CPU ms per answered request,
run-queue wait, context switches, minor page faults), then the mean batch size, forward time
and garbage collections from the server's metrics. Threads appear under their OS names
(`python` for the event loop and any thread that does not name itself). Linux only.

    .venv/bin/python -m bench.probes.threads --model digits-cbam --concurrency 64 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.httpclient import HttpRequest
from bench.inputs import INPUT_SETS, load_inputs
from bench.loadgen import closed_loop
from bench.server import ServerProcess, parse_metrics

__all__ = ["ThreadSample", "main", "sample_threads"]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ThreadSample:
    """One thread's cumulative counters at one moment."""

    name: str
    cpu_s: float  # user + system
    runqueue_wait_s: float
    switches: int
    voluntary_switches: int
    minor_faults: int


def sample_threads(pid: int) -> dict[int, ThreadSample]:
    """Counters of every thread of process `pid` (threads that exit meanwhile are skipped)."""
    samples = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        task = Path(f"/proc/{pid}/task/{tid}")
        try:
            name = (task / "comm").read_text().strip()
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
            _, wait_ns, switches = map(int, (task / "schedstat").read_text().split())
            status = (task / "status").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):
            continue
        voluntary = next(int(line.split()[1]) for line in status if line.startswith("voluntary"))
        samples[int(tid)] = ThreadSample(
            name=name,
            cpu_s=(int(stat[11]) + int(stat[12])) / CLOCK_TICKS,  # utime, stime
            runqueue_wait_s=wait_ns / 1e9,
            switches=switches,
            voluntary_switches=voluntary,
            minor_faults=int(stat[7]),
        )
    return samples


def _metric_sum(text: str, name: str) -> float:
    return sum(v for (sample, _), v in parse_metrics(text).items() if sample == name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.probes.threads", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", default="digits-cbam")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--maps", default="summary", choices=["none", "summary", "layers", "all"])
    p.add_argument("--inputs", default="digits", choices=list(INPUT_SETS))
    p.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    env = dict(item.split("=", 1) for item in args.server_env)
    server = ServerProcess({"models": args.model, "device": "cpu"}, extra_env=env)
    path = f"/v1/models/{args.model}/predict?maps={args.maps}"
    with server:
        requests = [
            HttpRequest.build("POST", server.host, server.port, path, i.data, i.content_type)
            for i in load_inputs(args.inputs)
        ]

        def step(seconds: float):
            load = closed_loop(
                server.host,
                server.port,
                requests,
                concurrency=args.concurrency,
                duration_s=seconds,
                warmup_s=0.0,
            )
            return asyncio.run(load)

        def metrics() -> str:
            return urllib.request.urlopen(server.base_url + "/metrics").read().decode()

        step(args.warmup)
        before, metrics_before, started = sample_threads(server.pid), metrics(), time.perf_counter()
        result = step(args.duration)
        wall = time.perf_counter() - started
        after, metrics_after = sample_threads(server.pid), metrics()

    answered = max(result.ok, 1)
    latencies = sorted(result.latencies_s)
    p50 = 1000 * latencies[len(latencies) // 2] if latencies else float("nan")
    print(f"{args.model} c={args.concurrency} maps={args.maps}: {result.ok / args.duration:.1f}"
          f" req/s, p50 {p50:.1f} ms, {result.ok} answered, wall {wall:.1f} s")  # fmt: skip
    print(f"{'thread':<22} {'cores':>6} {'ms/req':>7} {'runq s/s':>8} {'sw/s':>6} "
          f"{'vol/s':>6} {'flt/s':>6}")  # fmt: skip
    total = 0.0
    rows = []
    for tid, end in after.items():
        start = before.get(tid)
        if start is None:
            continue
        cpu = end.cpu_s - start.cpu_s
        total += cpu
        rows.append((cpu, tid, start, end))
    for cpu, tid, start, end in sorted(rows, key=lambda row: -row[0]):
        if cpu / wall < 0.005:
            continue
        print(
            f"{end.name + ':' + str(tid):<22} {cpu / wall:6.3f} {1000 * cpu / answered:7.3f} "
            f"{(end.runqueue_wait_s - start.runqueue_wait_s) / wall:8.3f} "
            f"{(end.switches - start.switches) / wall:6.0f} "
            f"{(end.voluntary_switches - start.voluntary_switches) / wall:6.0f} "
            f"{(end.minor_faults - start.minor_faults) / wall:6.0f}"
        )
    print(f"{'all threads':<22} {total / wall:6.3f} {1000 * total / answered:7.3f}")
    for name in ("attnserve_batch_size", "attnserve_inference_duration_seconds"):
        count = _metric_sum(metrics_after, name + "_count") - _metric_sum(
            metrics_before, name + "_count"
        )
        total_value = _metric_sum(metrics_after, name + "_sum") - _metric_sum(
            metrics_before, name + "_sum"
        )
        print(f"{name}: mean {total_value / max(count, 1):.4f} over {count:.0f} batches")
    print("garbage collections by generation:", _gc_collections(metrics_before, metrics_after))


def _gc_collections(before: str, after: str) -> str:
    """Collections per generation between two scrapes, as "gen0 N, gen1 N, gen2 N"."""
    start, end = parse_metrics(before), parse_metrics(after)
    counts = {
        dict(labels)["generation"]: value - start.get((name, labels), 0.0)
        for (name, labels), value in end.items()
        if name == "python_gc_collections_total"
    }
    return ", ".join(f"gen{gen} {counts[gen]:.0f}" for gen in sorted(counts))


if __name__ == "__main__":
    main()
