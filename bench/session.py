"""One benchmark session: runs load steps against the current server and turns each into a row.

A row joins the client's view (throughput, latency percentiles, errors, body sizes), the server's
(/metrics batch sizes, CPU from /proc) and the in-process limit measured right after the step at
the batch size the server formed, with the service's own pipeline functions.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.httpclient import Connection, HttpRequest
from bench.inprocess import InProcessPipeline
from bench.inputs import EncodedImage, load_inputs
from bench.loadgen import StepResult, closed_loop, open_loop
from bench.server import ServerProcess, batch_stats, machine_busy_seconds, parse_metrics
from models.package import CARD_FILE, read_card
from service.api.schemas import PredictOptions as MapOptions
from service.device import DeviceWorker, default_instances, resolve_device
from service.repository import discover
from service.settings import Settings

__all__ = ["Session", "Step", "loop_factory"]


@dataclass(frozen=True)
class Step:
    """What one load step does: group, model, closed-loop concurrency or open-loop rate, options."""

    group: str
    model: str
    concurrency: int | None
    maps: str = "summary"  # level, or "level:format" such as "all:png"
    inputs: str = "digits"
    delay_ms: float = 0.0
    rate: float | None = None
    torch_threads: int | None = None
    instances: int = 0  # the server's ATTNSERVE_INSTANCES (0: its default)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop keeps the client's CPU share low; the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


class Session:
    """Holds the current server, the in-process pipelines, the inputs and the rows measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[dict[str, Any]] = []
        self.servers: list[dict[str, Any]] = []
        self.server: ServerProcess | None = None
        self._runner = asyncio.Runner(loop_factory=loop_factory())
        self._pipelines: dict[str, InProcessPipeline] = {}
        self._workers: dict[tuple[int, int], DeviceWorker] = {}
        self._inputs: dict[str, list[EncodedImage]] = {}

    def describe_models(self, names: list[str]) -> list[dict[str, Any]]:
        """What was benchmarked: architecture options and weights hash of each model."""
        settings = Settings(models=[], random_models=list(self.args.random_models))
        sources = {source.name: source for source in discover(settings)}
        described = []
        for name in dict.fromkeys(names):
            source = sources[name]
            entry = {"name": name, "arch": source.arch, "attention": source.attention}
            if source.package is None:
                entry["weights"] = "random"
            else:
                card = read_card(source.package / CARD_FILE)
                entry.update(model_kwargs=card.model_kwargs, weights_sha256=card.weights_sha256)
            described.append(entry)
        return described

    @staticmethod
    def zoo_names() -> list[str]:
        """The models a server with default settings hosts (the zoo, or its random fallback)."""
        return [s.name for s in discover(Settings(models=[], random_models=[]))]

    def register(self, server: ServerProcess, settings: dict[str, str]) -> None:
        """Record a started server and direct the next steps at it."""
        entry = {"settings": settings, "env": server.extra_env, "startup_s": server.startup_s}
        self.servers.append(entry)
        self.server = server

    def use(self, server: ServerProcess) -> None:
        """Direct the next steps at `server` (registered and running)."""
        self.server = server

    def close(self) -> None:
        """Stop the in-process pipelines' threads and the client's event loop."""
        for pipeline in self._pipelines.values():
            pipeline.close()
        for worker in self._workers.values():
            worker.close()
        self._runner.close()

    def inputs(self, name: str) -> list[EncodedImage]:
        """The encoded files of input set `name` (loaded once)."""
        if name not in self._inputs:
            self._inputs[name] = load_inputs(name, self.args.input_size)
        return self._inputs[name]

    def _requests(self, step: Step) -> list[HttpRequest]:
        server = self._server()
        options = map_options(step.maps)
        path = f"/v1/models/{step.model}/predict?maps={options.maps}"
        path += f"&map_format={options.map_format}" if options.map_format != "json" else ""
        return [
            HttpRequest.build(
                "POST", server.host, server.port, path, i.data, i.content_type, i.name
            )
            for i in self.inputs(step.inputs)
        ]

    def _server(self) -> ServerProcess:
        if self.server is None:
            raise RuntimeError("no server in use")
        return self.server

    async def _probe(self) -> dict[str, Any]:
        """CPU counters of both sides and the server's /metrics, at one edge of the window."""
        server = self._server()
        snapshot = {
            "t": time.perf_counter(),
            "client_cpu": time.process_time(),
            "server_cpu": server.cpu_seconds(),
            "machine_busy": machine_busy_seconds(),
        }
        conn = Connection(server.host, server.port)
        try:
            _, body = await conn.send(
                HttpRequest.build("GET", server.host, server.port, "/metrics")
            )
        finally:
            await conn.close()
        snapshot["metrics"] = parse_metrics(body.decode())
        return snapshot

    def closed(self, step: Step) -> dict[str, Any]:
        """A closed-loop step at `step.concurrency`."""
        server, args = self._server(), self.args
        load = closed_loop(
            server.host,
            server.port,
            self._requests(step),
            concurrency=step.concurrency or 1,
            duration_s=args.duration,
            warmup_s=args.warmup,
            probe=self._probe,
        )
        return self._row(step, self._runner.run(load))

    def open(self, step: Step, arrival: str) -> dict[str, Any]:
        """An open-loop step at `step.rate` requests per second."""
        server, args = self._server(), self.args
        load = open_loop(
            server.host,
            server.port,
            self._requests(step),
            rate=step.rate or 1.0,
            duration_s=args.duration,
            warmup_s=args.warmup,
            arrival=arrival,
            probe=self._probe,
        )
        row = self._row(step, self._runner.run(load))
        row["arrival"] = arrival
        return row

    def saturation(self, model: str, fallback: Step) -> float:
        """Throughput at the top concurrency from the sweep, or measured now with `fallback`."""
        for row in self.rows:
            if (row["group"], row["model"], row["concurrency"]) == (
                "sweep",
                model,
                fallback.concurrency,
            ):
                return float(row["throughput_rps"])
        return float(self.closed(fallback)["throughput_rps"])

    def prepare_pipelines(self, models: list[str], steps: list[Step]) -> None:
        """Build every in-process pipeline the steps will use before the first measurement.

        The pipelines of one (threads, instances) configuration share a device worker, as the
        server's models share one: libgomp stops spin-waiting once a process has more OpenMP
        team threads than CPUs, so a team per model would slow every limit with more than
        one intra-op thread. Building them all up front keeps every limit in the same state.
        """
        for model in dict.fromkeys(models):
            for step in steps:
                for threads, instances in self.limit_configs(step):
                    self._pipeline(model, threads, instances)

    def limit_configs(self, step: Step) -> list[tuple[int, int]]:
        """(intra-op threads per instance, instances) of the in-process limits for `step`.

        Always one device thread with every intra-op thread; when the server runs N instances,
        also N side-by-side pipelines sharing the threads. The faster one is the limit, so a
        server setting never lowers the bar it is measured against.
        """
        total = step.torch_threads or torch.get_num_threads()
        device = resolve_device(self.args.device)
        instances = step.instances or default_instances(device, total)
        configs = [(total, 1)]
        if instances > 1:
            configs.append((max(1, total // instances), instances))
        return configs

    def _pipeline(self, model: str, threads: int, instances: int) -> InProcessPipeline:
        """One in-process pipeline per (model, threads, instances), built on first use."""
        key = f"{model}/{threads}x{instances}"
        if key not in self._pipelines:
            if (threads, instances) not in self._workers:
                device = resolve_device(self.args.device)
                worker = DeviceWorker(device, threads=threads, instances=instances)
                self._workers[threads, instances] = worker
            self._pipelines[key] = InProcessPipeline(
                model,
                device=self.args.device,
                random_models=tuple(self.args.random_models),
                worker=self._workers[threads, instances],
            )
        return self._pipelines[key]

    def _limit(self, step: Step, batch_size: int) -> dict[str, Any]:
        """The best in-process limit over `limit_configs(step)`, each one's rate in `modes`."""
        limits = []
        for threads, instances in self.limit_configs(step):
            start = _counters()
            limit = self._pipeline(step.model, threads, instances).measure(
                [image.data for image in self.inputs(step.inputs)],
                batch_size=batch_size,
                options=map_options(step.maps),
                budget_s=self.args.limit_seconds,
            )
            ends = zip(start, _counters(), strict=True)
            elapsed, busy, own = (end - begin for begin, end in ends)
            limit["other_cores"] = round(max(0.0, (busy - own) / elapsed), 3)
            limit["mode"] = f"{instances}x{threads}"
            limits.append(limit)
        best = max(limits, key=lambda limit: limit["limit_rps"])
        best["modes"] = {limit["mode"]: round(limit["limit_rps"], 2) for limit in limits}
        # The c=1 target compares with the quickest single round, whichever mode ran it.
        best["fastest_round_ms"] = min(limit["round_ms_median"] for limit in limits)
        return best

    def _row(self, step: Step, result: StepResult) -> dict[str, Any]:
        """The step's row: client summary, batch sizes, CPU use, in-process limit and ratio."""
        server = self._server()
        server.check_alive()
        before, after = result.probes
        wall = after["t"] - before["t"]
        batch = batch_stats(before["metrics"], after["metrics"], step.model)
        row = {**dataclasses.asdict(step), **result.summary(), "batch": batch}
        row["cpu"] = _cpu(before, after, wall, result.ok)
        limit = self._limit(step, max(1, round(batch["mean"])))
        row["limit"] = limit
        row["limit_ratio"] = row["throughput_rps"] / limit["limit_rps"]
        server_cpu = row["cpu"]["server_cpu_ms_per_request"]
        row["cpu"]["server_overhead_cpu_ms"] = round(server_cpu - limit["cpu_ms_per_image"], 3)
        self.rows.append(row)
        print(_progress(row), flush=True)
        return row


def map_options(maps: str) -> MapOptions:
    """ "summary" or "all:png" (level, optional map_format) as the service's MapOptions."""
    level, _, fmt = maps.partition(":")
    return MapOptions(maps=level, map_format=fmt or "json")  # type: ignore[arg-type]


def _counters() -> tuple[float, float, float]:
    """Wall clock, the machine's busy CPU seconds and this process's CPU seconds."""
    return time.perf_counter(), machine_busy_seconds(), time.process_time()


def _cpu(before: dict[str, Any], after: dict[str, Any], wall: float, ok: int) -> dict[str, float]:
    """Cores used by the server, the client and everything else over the window."""
    server = (after["server_cpu"] - before["server_cpu"]) / wall
    client = (after["client_cpu"] - before["client_cpu"]) / wall
    machine = (after["machine_busy"] - before["machine_busy"]) / wall
    return {
        "server_cores": round(server, 3),
        "client_cores": round(client, 3),
        "client_share": round(client / (client + server), 3) if client + server else 0.0,
        "other_cores": round(max(0.0, machine - server - client), 3),
        "server_cpu_ms_per_request": round(1000 * server * wall / ok, 3) if ok else 0.0,
        "client_cpu_ms_per_request": round(1000 * client * wall / ok, 3) if ok else 0.0,
    }


def _progress(row: dict[str, Any]) -> str:
    load = f"c={row['concurrency']}" if row["rate"] is None else f"rate={row['rate']}"
    lat = row["latency_ms"]
    return (
        f"[{row['group']:6}] {row['model']:16} {load:11} maps={row['maps']:7} "
        f"in={row['inputs']:11} delay={row['delay_ms']:g} -> {row['throughput_rps']:7.1f} rps "
        f"p50 {lat['p50']:7.2f} p99 {lat['p99']:7.2f} ms batch {row['batch']['mean']:5.2f} "
        f"srv {row['cpu']['server_cores']:.2f} cli {row['cpu']['client_cores']:.2f} "
        f"oth {row['cpu']['other_cores']:.2f} | limit {row['limit']['limit_rps']:7.1f} "
        f"({row['limit_ratio']:.0%}) err {row['error_count']} drop {row['drops']}"
    )
