"""`python -m bench.peers`: attnserve beside LitServe and TorchServe on the same model, same load.

Every server serves the same weights: a randomly initialised model from attnserve's registry
(seeded by its name), saved as an attnserve package and exported as one frozen TorchScript
trace without attention capture, which both peers load (attnserve traces and freezes the same
module itself and is asked for maps=none, so every server does the same work). The peers run
from their own virtual environment (`--peers-venv`, see docs/performance.md); a peer that is
not installed there is skipped with the reason printed.

In each round every server starts in turn (the order rotates), answers each photo once per
model (its top-5 probabilities are checked against the TorchScript file's), takes an
unmeasured burst at the top concurrency, then the same closed-loop load (bench.loadgen, the
same JPEG photos) at each concurrency for each model, and stops. The table gives each
server's median over the rounds of req/s and p50/p90/p99. For attnserve the per-request access
log of each measured window (queue wait, batch size, time in the server) is summarised too.

Servers are given as `kind[+key=value...]`: `attnserve` (keys: `autocast`, `max_batch_size`,
`delay_ms`, `instances`: the models' config.json; `workers`, `channels_last`: the server's
ATTNSERVE_INSTANCES and ATTNSERVE_CHANNELS_LAST),
`litserve` and `torchserve` (keys: `workers`, `batch`, `delay_ms`; each worker gets
cores/workers torch threads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.httpclient import HttpRequest
from bench.inputs import load_inputs
from bench.loadgen import closed_loop
from bench.peer_servers import PeerSkipped
from bench.peerserve import SERVER_KINDS, export_models, make_server, parse_spec

__all__ = ["compare", "main", "predictions", "summarise_access", "table"]

DEFAULT_SERVERS = (
    "attnserve,attnserve+max_batch_size=8,attnserve+autocast=bf16+workers=1+channels_last=true,"
    "litserve+workers=2,torchserve+workers=2"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet50:se,resnet50:cbam", help='"arch:block" list')
    p.add_argument("--servers", default=DEFAULT_SERVERS, help=f"kinds: {list(SERVER_KINDS)}")
    p.add_argument("--concurrency", default="8,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per step")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per step")
    p.add_argument("--peers-venv", type=Path, default=Path("/work/peers-venv"))
    p.add_argument(
        "--workdir", type=Path, default=Path("/tmp/attnserve-peers"), help="exports (reused)"
    )
    p.add_argument("--out", type=Path, help="write every step's numbers as JSON here")
    return p


def predictions(body: bytes) -> list[dict[str, Any]]:
    """The top predictions of one answer: attnserve's `results[0]` or a peer's own object."""
    data = json.loads(body)
    return list((data["results"][0] if "results" in data else data)["predictions"])


def compare(answer: list[dict[str, Any]], reference: list[tuple[int, float]]) -> tuple[bool, float]:
    """Whether the top-1 class is the reference's, and the largest difference of a probability
    of a class in both top-5 lists."""
    wanted = dict(reference)
    diffs = [abs(p["probability"] - wanted[p["index"]]) for p in answer if p["index"] in wanted]
    return answer[0]["index"] == reference[0][0], max(diffs, default=float("inf"))


def summarise_access(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-request access-log records of one window -> batch sizes, queue wait and time in the
    server at p50/p99, and what the slowest 1 % of requests had in common."""
    if not records:
        return {}
    lat = sorted(records, key=lambda r: r["latency_ms"])
    slow = lat[int(0.99 * (len(lat) - 1)) :]

    def pct(key: str, rows: list[dict[str, Any]], q: float) -> float:
        values = sorted(r[key] for r in rows)
        return round(values[min(len(values) - 1, int(q * (len(values) - 1)))], 1)

    for r in records:
        r["serve_ms"] = r["latency_ms"] - r["queue_ms"]
    sizes: dict[int, int] = {}
    for r in records:
        sizes[r["batch_size"]] = sizes.get(r["batch_size"], 0) + 1
    return {
        "requests": len(records),
        "batch_sizes": dict(sorted(sizes.items())),
        "queue_ms": {"p50": pct("queue_ms", records, 0.5), "p99": pct("queue_ms", records, 0.99)},
        "serve_ms": {"p50": pct("serve_ms", records, 0.5), "p99": pct("serve_ms", records, 0.99)},
        "slowest": [
            {k: round(r[k], 1) for k in ("latency_ms", "queue_ms", "serve_ms", "batch_size")}
            for r in slow[-3:]
        ],
    }


async def _load(server: Any, model: str, concurrency: int, args: Any) -> dict[str, Any]:
    requests = [
        HttpRequest.build(
            "POST", "127.0.0.1", server.port, server.path(model), i.data, i.content_type
        )
        for i in load_inputs("photos-jpeg")
    ]
    marks: list[int] = []

    async def probe() -> dict[str, float]:
        marks.append(server.log_offset())
        return {}

    result = await closed_loop(
        "127.0.0.1",
        server.port,
        requests,
        concurrency=concurrency,
        duration_s=args.duration,
        warmup_s=args.warmup,
        probe=probe,
    )
    s = result.summary()
    lat = s["latency_ms"]
    p90 = float(np.percentile(result.latencies_s, 90)) * 1000 if result.ok else float("nan")
    row = {
        "rps": s["throughput_rps"],
        "p50": lat["p50"],
        "p90": p90,
        "p99": lat["p99"],
        "errors": s["error_count"],
    }
    records = server.access_records(*marks) if len(marks) == 2 else []
    if records:
        row["access"] = summarise_access(records)
    return row


def _check(server: Any, model: str, reference: dict[str, list[tuple[int, float]]]) -> dict:
    """Top-1 agreement with the TorchScript file over the photos, and the largest difference
    of a probability (`compare`)."""
    agree, worst, photos = 0, 0.0, load_inputs("photos-jpeg")
    for image in photos:
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}{server.path(model)}",
            data=image.data,
            headers={"Content-Type": image.content_type},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            same, diff = compare(predictions(response.read()), reference[image.name])
        agree, worst = agree + same, max(worst, diff)
    return {"top1": agree / len(photos), "max_diff": worst}


def _round(spec: str, models: list[str], exported: dict[str, Any], args: Any) -> dict:
    server = make_server(spec, exported, args)
    with server:
        out = {}
        for model in models:
            out[model, "check"] = _check(server, model, exported[model].reference)
            # A burst at the top concurrency first: every batch size the load forms is warm.
            asyncio.run(_load(server, model, max(args.concurrencies), _Warm(args)))
            for c in args.concurrencies:
                out[model, c] = asyncio.run(_load(server, model, c, args))
                print(f"  {spec} {model} c={c}: {_line(out[model, c])}", flush=True)
        return out


class _Warm:
    """Step arguments of the unmeasured warm-up burst."""

    def __init__(self, args: Any) -> None:
        self.duration, self.warmup = 2.0, max(4.0, args.warmup)


def _line(row: dict[str, Any]) -> str:
    text = f"{row['rps']:.1f} req/s p50 {row['p50']:.0f} p90 {row['p90']:.0f} p99 {row['p99']:.0f}"
    access = row.get("access")
    if access:
        text += f" | batches {access['batch_sizes']} queue {access['queue_ms']}"
        text += f" serve {access['serve_ms']} slowest {access['slowest']}"
    return text


def table(runs: dict[str, list[dict]], models: list[str], concurrencies: list[int]) -> list[str]:
    """Markdown rows: per model and concurrency, each server's medians over its rounds."""
    lines = [
        "| model | c | server | req/s | p50 ms | p90 ms | p99 ms | rounds (req/s; p99) "
        "| top-1 agree | max abs diff | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    med = statistics.median
    for model in models:
        for c in concurrencies:
            for spec, rounds in runs.items():
                rows = [r[model, c] for r in rounds if (model, c) in r]
                if not rows:
                    continue
                check = rounds[-1][model, "check"]
                spread = ", ".join(f"{r['rps']:.1f}; {r['p99']:.0f}" for r in rows)
                lines.append(
                    f"| {model} | {c} | {spec} | {med(r['rps'] for r in rows):.1f} "
                    f"| {med(r['p50'] for r in rows):.0f} | {med(r['p90'] for r in rows):.0f} "
                    f"| {med(r['p99'] for r in rows):.0f} | {spread} | {check['top1']:.2f} "
                    f"| {check['max_diff']:.1e} "
                    f"| {sum(r['errors'] for r in rows)} |"
                )
    return lines


def autogroup_warning() -> str | None:
    """A warning when the scheduler shares the CPU between sessions first (autogroups) and
    this session's group has no more weight than any other: another session's nice-19 job
    then takes an equal share from the benchmark (docs/performance.md)."""
    try:
        enabled = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
        nice = int(Path("/proc/self/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None
    if not enabled or nice < 0:
        return None
    return (
        "warning: scheduler autogroups are on and this session's group has nice "
        f"{nice}: other sessions' work, nice 19 included, shares the CPU equally with this "
        "run. Run it as setsid sh -c 'echo -20 > /proc/self/autogroup; exec ...'"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warning = autogroup_warning()
    if warning:
        print(warning, flush=True)
    args.concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    specs = [s for s in args.servers.split(",") if s]
    for spec in specs:
        parse_spec(spec)  # a typo fails before anything starts
    runs: dict[str, list[dict]] = {}
    for spec in specs:
        try:
            make_server(spec, {}, args).check_installed()
        except PeerSkipped as exc:
            print(f"skipping {spec}: {exc}", flush=True)
            continue
        runs[spec] = []
    if not runs:
        print("no server to measure")
        return 0
    exported = export_models([m for m in args.models.split(",") if m], args.workdir)
    models = list(exported)
    for index in range(args.rounds):
        order = list(runs)[index % len(runs) :] + list(runs)[: index % len(runs)]
        for spec in order:
            print(f"round {index + 1}/{args.rounds}: {spec}", flush=True)
            runs[spec].append(_round(spec, models, exported, args))
    print("\n".join(table(runs, models, args.concurrencies)))
    if args.out:
        rows = {
            spec: [{f"{k[0]} {k[1]}": v for k, v in r.items()} for r in rounds]
            for spec, rounds in runs.items()
        }
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
