"""`python -m bench.run`: the real attnserve server under load against its in-process limit.

Starts `python -m service serve` (ATTNSERVE_* settings, free 127.0.0.1 port), runs the groups
(closed-loop concurrency sweep of every model; maps none/all and other input sets on a few
models; open-loop arrival rates; the target steps again in interleaved rounds; max_batch_delay_ms
on separate servers), measures the in-process limit after each step at the batch size the server
formed, writes JSON, Markdown and a PNG plot, prints each target with pass/miss, and stops the
server with SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import report
from bench.inputs import INPUT_SETS
from bench.machine import describe_machine, machine_state, wait_until_quiet
from bench.server import REPO_ROOT, ServerProcess
from bench.session import Session, Step

__all__ = ["main"]

GROUPS = ("sweep", "maps", "inputs", "open", "rounds", "delay", "instances")
# CBAM (genuine channel and spatial gates) and CoordAtt (the largest maps=all answers).
MAPS_MODELS = ("digits-cbam", "digits-coordatt")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _csv(cast: Any) -> Any:
    return lambda text: [cast(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    """Every flag; --quick shortens steps and trims the model list for development runs."""
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short steps, two models, fewer points")
    p.add_argument("--models", type=_csv(str), help="models to sweep (default: every served one)")
    p.add_argument("--concurrency", type=_csv(int), default=[1, 4, 16, 64])
    p.add_argument("--duration", type=float, help="measured seconds per step (4; quick 1)")
    p.add_argument(
        "--warmup", type=float, help="unmeasured seconds before each step (1; quick 0.3)"
    )
    p.add_argument(
        "--limit-seconds", type=float, help="in-process budget per step (1.5; quick 0.25)"
    )
    p.add_argument("--groups", type=_csv(str), default=list(GROUPS), help=",".join(GROUPS))
    p.add_argument("--inputs", default="auto", choices=["auto", *INPUT_SETS])
    p.add_argument("--compare-inputs", type=_csv(str), default=["photos-jpeg", "photos-png"])
    p.add_argument(
        "--maps-models",
        type=_csv(str),
        help="models for maps/inputs/open/variants (digits-cbam,digits-coordatt)",
    )
    p.add_argument(
        "--maps-levels",
        type=_csv(str),
        default=["none", "summary", "all", "all:png"],
        help='maps levels to compare; "level:png" asks for map_format=png',
    )
    p.add_argument("--delays", type=_csv(float), help="max_batch_delay_ms values (0,2,5)")
    p.add_argument("--open-rates", type=_csv(float), help="fractions of saturation throughput")
    p.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson")
    p.add_argument("--rounds", type=int, help="interleaved rounds of the target steps (3; quick 1)")
    _server_flags(p)
    p.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to S s for a quiet box")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true")
    return p


def _server_flags(p: argparse.ArgumentParser) -> None:
    """Flags that shape the servers: device, models with random weights, threads, env, root."""
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--arch", help="serve arch:attention with random weights (e.g. resnet50)")
    p.add_argument("--attention", default="cbam", help="block for --arch")
    p.add_argument("--input-size", type=int, help="send images resized to N x N")
    p.add_argument("--torch-threads", type=int, help="intra-op threads, server and in-process")
    p.add_argument("--instances", type=int, default=0, help="ATTNSERVE_INSTANCES (0: default)")
    p.add_argument("--compare-instances", type=int, default=1, help="instances group: this count")
    p.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server")
    p.add_argument("--server-root", type=Path, help="run `-m service` from this checkout")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --quick, --arch and the models the server will host."""
    quick = args.quick
    args.duration = args.duration or (1.0 if quick else 4.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if quick else 1.0)
    args.limit_seconds = args.limit_seconds or (0.25 if quick else 1.5)
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
    args.random_models = [f"{args.arch}:{args.attention}"] if args.arch else []
    if args.models is None:
        if args.arch:
            args.models = [f"{args.arch}-{args.attention}-random"]
        else:
            args.models = ["digits-cbam", "digits-se"] if quick else Session.zoo_names()
    if not args.maps_models:
        preferred = [m for m in MAPS_MODELS if m in args.models and not quick]
        args.maps_models = preferred or args.models[:1]
    args.delays = args.delays if args.delays is not None else ([0, 5] if quick else [0, 2, 5])
    if args.open_rates is None:
        args.open_rates = [0.5, 1.0] if quick else [0.25, 0.5, 0.75, 0.9, 1.1]
    if args.inputs == "auto":
        args.inputs = "photos-jpeg" if args.arch else "digits"
    unknown = sorted(set(args.groups) - set(GROUPS))
    if unknown:
        raise SystemExit(f"unknown group(s) {unknown}; valid: {list(GROUPS)}")
    return args


def server_settings(
    args: argparse.Namespace, models: Sequence[str], delay_ms: float, instances: int
) -> dict:
    """ATTNSERVE_* settings (without the prefix) for a server hosting `models`."""
    zoo = list(dict.fromkeys(m for m in models if not m.endswith("-random")))
    zoo = zoo or Session.zoo_names()[:1]
    settings = {
        "models": ",".join(zoo),
        "max_batch_delay_ms": str(delay_ms),
        "max_batch_size": str(args.max_batch_size),
        "device": args.device,
        "instances": str(instances),
    }
    if args.random_models:
        settings["random_models"] = ",".join(args.random_models)
    return settings


def _extra_env(args: argparse.Namespace) -> dict[str, str]:
    """--server-env pairs, plus OMP_NUM_THREADS (torch's intra-op pool) with --torch-threads."""
    env = {key: value for key, _, value in (item.partition("=") for item in args.server_env)}
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    return env


def start_server(args: argparse.Namespace, settings: dict) -> ServerProcess:
    """A server process (not yet started) for `settings`, from --server-root if given."""
    root = args.server_root or REPO_ROOT
    return ServerProcess(settings, extra_env=_extra_env(args), root=root)


def main_server_groups(session: Session, args: argparse.Namespace) -> None:
    """Everything that runs on the delay-0 server hosting all models."""
    top = max(args.concurrency)
    base = {
        "inputs": args.inputs,
        "delay_ms": 0.0,
        "torch_threads": args.torch_threads,
        "instances": args.instances,
    }
    if "sweep" in args.groups:
        for model in args.models:
            for c in args.concurrency:
                session.closed(Step("sweep", model, concurrency=c, maps="summary", **base))
    for model in args.maps_models:
        if "maps" in args.groups:
            for level in args.maps_levels:
                for c in sorted({1, top}):
                    session.closed(Step("maps", model, concurrency=c, maps=level, **base))
        if "inputs" in args.groups:
            for inputs in args.compare_inputs:
                for c in sorted({1, top}):
                    session.closed(
                        Step("inputs", model, c, "summary", **{**base, "inputs": inputs})
                    )
    if "open" in args.groups:
        model = args.maps_models[0]
        saturation = session.saturation(model, Step("open", model, top, "summary", **base))
        for fraction in args.open_rates:
            # At least 10 arrivals per window, so a collapsed saturation still yields a step.
            rate = round(max(fraction * saturation, 10.0 / args.duration), 1)
            session.open(Step("open", model, None, "summary", rate=rate, **base), args.arrival)
    if "rounds" in args.groups:
        target_rounds(session, args, base)


def target_rounds(session: Session, args: argparse.Namespace, base: dict[str, Any]) -> None:
    """The steps the targets are judged on, again, in `args.rounds` rounds: every model at
    concurrency 1 and the top one, then maps none and all at the top one for the maps models.

    A shared machine has slower and faster phases; interleaving puts each round's steps in the
    same phase, and the targets take the median over rounds (`report.evaluate_targets`)."""
    top = max(args.concurrency)
    for _ in range(args.rounds):
        for model in args.models:
            for c in sorted({1, top}):
                session.closed(Step("rounds", model, c, "summary", **base))
        for model in args.maps_models:
            for level in ("none", "all"):
                session.closed(Step("rounds", model, top, level, **base))


def variant_specs(args: argparse.Namespace) -> list[tuple[float, int]]:
    """(max_batch_delay_ms, instances) of the variant servers beside the main one."""
    specs = [(d, args.instances) for d in args.delays if d > 0] * ("delay" in args.groups)
    if "instances" in args.groups and args.compare_instances != args.instances:
        specs.append((0.0, args.compare_instances))
    return specs


def variant_groups(session: Session, args: argparse.Namespace, main: ServerProcess) -> None:
    """The first maps model on the main server (delay 0) and on one server per variant (each
    max_batch_delay_ms > 0, the other instance count), steps interleaved so that load from
    other processes on a shared machine hits every variant alike."""
    model = args.maps_models[0]
    specs = variant_specs(args)
    if not specs:
        return
    with contextlib.ExitStack() as stack:
        servers = [(0.0, args.instances, main)]
        for delay, instances in specs:
            settings = server_settings(args, [model], delay, instances)
            server = stack.enter_context(start_server(args, settings))
            session.register(server, settings)
            servers.append((delay, instances, server))
        for c in args.concurrency:
            for delay, instances, server in servers:
                session.use(server)
                step = Step(
                    "variants", model, c, "summary", args.inputs, delay, None,
                    args.torch_threads, instances,
                )  # fmt: skip
                session.closed(step)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All groups, in order, with the machine described before and after."""
    quiet = wait_until_quiet(args.wait_quiet) if args.wait_quiet > 0 else machine_state()
    machine = describe_machine(args.device)
    session = Session(args)
    models = session.describe_models([*args.models, *args.maps_models])
    started = time.monotonic()
    try:
        steps = [
            Step("", "", None, torch_threads=args.torch_threads, instances=instances)
            for instances in dict.fromkeys([args.instances, *(i for _, i in variant_specs(args))])
        ]
        session.prepare_pipelines([*args.models, *args.maps_models], steps)
        settings = server_settings(args, args.models + args.maps_models, 0.0, args.instances)
        with start_server(args, settings) as server:
            session.register(server, settings)
            main_server_groups(session, args)
            variant_groups(session, args, server)
    finally:
        session.close()
    return {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python", "-m", "bench.run", *args.argv]),
        "config": report.jsonable(vars(args)),
        "machine": machine,
        "machine_state": {"before": quiet, "after": machine_state()},
        "servers": session.servers,
        "models": models,
        "wall_s": round(time.monotonic() - started, 1),
        "steps": session.rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run, write results under --out, print the table and the targets."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve(build_parser().parse_args(argv))
    args.argv = argv
    results = run(args)
    results["targets"] = report.evaluate_targets(results)
    paths = report.write_all(results, args.out, plot=not args.no_plot)
    print(report.targets_text(results["targets"]))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
