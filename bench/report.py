"""Benchmark results -> targets (pass/miss), JSON, a Markdown table and a PNG plot."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["evaluate_targets", "jsonable", "markdown", "targets_text", "write_all"]

SATURATION_RATIO = 0.85
C1_OVERHEAD_MS = 3.0
MAPS_ALL_COST = 0.15
CONTENDED_CORES = 0.25  # other processes' CPU use above which a step's numbers are suspect


def jsonable(value: Any) -> Any:
    """Paths and other objects as strings, NaN as None, so the JSON is strict."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def _find(rows: Iterable[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _all(rows: Iterable[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [row for row in rows if all(row.get(k) == v for k, v in match.items())]


def _target(
    name: str, rows: list[dict[str, Any]], values: list[float], bound: float, higher: bool
) -> dict[str, Any]:
    """One target's verdict on the median of `values` (one per round, or a single step);
    `contended` when other processes used the CPU during its steps."""
    measured = statistics.median(values)
    passed = measured >= bound if higher else measured <= bound
    other = max(_other_cores(r) for r in rows)
    return {
        "target": name,
        "model": rows[0]["model"],
        "measured": round(measured, 3),
        "values": [round(v, 3) for v in values],
        "bound": f"{'>=' if higher else '<='} {bound:g}",
        "passed": bool(passed),
        "contended": other > CONTENDED_CORES,
        "other_cores_max": round(other, 2),
    }


def _c1_overhead(row: dict[str, Any]) -> float:
    limit = row["limit"]
    return float(row["latency_ms"]["p50"] - limit.get("fastest_round_ms", limit["round_ms_median"]))


def _maps_cost(none: dict[str, Any], full: dict[str, Any]) -> float:
    return 1.0 - full["throughput_rps"] / none["throughput_rps"]


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The three targets for every model that has the steps they need: the median over the
    "rounds" group's rounds where it ran (maps cost paired within each round), else the sweep's
    and the maps group's single steps."""
    rows = results["steps"]
    top = max(results["config"]["concurrency"])
    targets = []
    models = dict.fromkeys(r["model"] for r in rows if r["group"] in ("sweep", "rounds"))
    for model in models:
        group = "rounds" if _find(rows, group="rounds", model=model, maps="summary") else "sweep"
        sat = _all(rows, group=group, model=model, concurrency=top, maps="summary")
        if sat:
            name = f"c={top} throughput / in-process limit at batch {sat[0]['limit']['batch_size']}"
            if group == "rounds":
                name = f"c={top} throughput / in-process limit (median of {len(sat)} rounds)"
            ratios = [r["limit_ratio"] for r in sat]
            targets.append(_target(name, sat, ratios, SATURATION_RATIO, True))
        one = _all(rows, group=group, model=model, concurrency=1, maps="summary")
        if one:
            name = "c=1 p50 minus in-process single-image time (ms)"
            gaps = [_c1_overhead(r) for r in one]
            targets.append(_target(name, one, gaps, C1_OVERHEAD_MS, False))
    models = dict.fromkeys(r["model"] for r in rows if r["group"] in ("maps", "rounds"))
    for model in models:
        group = "rounds" if _find(rows, group="rounds", model=model, maps="all") else "maps"
        none = _all(rows, group=group, model=model, concurrency=top, maps="none")
        full = _all(rows, group=group, model=model, concurrency=top, maps="all")
        pairs = [(n, f) for n, f in zip(none, full, strict=False) if n["throughput_rps"] > 0]
        if pairs:
            name = f"maps=all throughput cost vs maps=none (c={top})"
            costs = [_maps_cost(n, f) for n, f in pairs]
            used = [row for pair in pairs for row in pair]
            targets.append(_target(name, used, costs, MAPS_ALL_COST, False))
    return targets


def targets_text(targets: list[dict[str, Any]]) -> str:
    """One line per target: PASS/MISS, what, model, measured value and bound."""
    lines = ["targets:"]
    for t in targets:
        verdict = "PASS" if t["passed"] else "MISS"
        busy = f"  [machine busy: {t['other_cores_max']} other cores]" if t["contended"] else ""
        rounds = f" of {t['values']}" if len(t.get("values", ())) > 1 else ""
        lines.append(
            f"  {verdict}  {t['target']} [{t['model']}]: {t['measured']}{rounds} ({t['bound']})"
            f"{busy}"
        )
    return "\n".join(lines)


def _other_cores(row: dict[str, Any]) -> float:
    """Cores other processes used during the load step or during its in-process limit."""
    return max(row["cpu"]["other_cores"], row["limit"].get("other_cores", 0.0))


def _other(cores: float) -> str:
    return f"**{cores:.2f}**" if cores > CONTENDED_CORES else f"{cores:.2f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _load(row: dict[str, Any]) -> str:
    return f"c={row['concurrency']}" if row["rate"] is None else f"{row['rate']:g}/s open"


def _steps_table(steps: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| group | model | load | maps | inputs | delay ms | instances | req/s | p50 ms "
        "| p95 ms | p99 ms | err/drop | mean batch | server CPU | client CPU (share) "
        "| other CPU | resp bytes | limit req/s (mode) | service/limit |",
        "|" + "---|" * 19,
    ]
    for r in steps:
        lat, cpu = r["latency_ms"], r["cpu"]
        lines.append(
            f"| {r['group']} | {r['model']} | {_load(r)} | {r['maps']} | {r['inputs']} "
            f"| {r['delay_ms']:g} | {r.get('instances') or 'default'} "
            f"| {r['throughput_rps']:.1f} | {_ms(lat['p50'])} | {_ms(lat['p95'])} "
            f"| {_ms(lat['p99'])} | {r['error_count']}/{r['drops']} | {r['batch']['mean']:.2f} "
            f"| {cpu['server_cores']:.2f} | {cpu['client_cores']:.2f} ({cpu['client_share']:.0%}) "
            f"| {_other(_other_cores(r))} | {r['response_bytes_mean']:.0f} "
            f"| {r['limit']['limit_rps']:.1f} ({r['limit'].get('mode', '1x')}) "
            f"| {r['limit_ratio']:.0%} |"
        )
    return lines


def _stages_table(steps: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| group | model | load | maps | inputs | batch | decode+preprocess | forward | maps "
        "| build | encode | total | CPU ms/img | server CPU ms/req |",
        "|" + "---|" * 14,
    ]
    for r in steps:
        s, lim = r["limit"]["ms_per_image"], r["limit"]
        lines.append(
            f"| {r['group']} | {r['model']} | {_load(r)} | {r['maps']} | {r['inputs']} "
            f"| {lim['batch_size']} | {s['decode_preprocess']:.3f} | {s['forward']:.3f} "
            f"| {s['maps']:.3f} | {s['build']:.3f} | {s['encode']:.3f} | {s['total']:.3f} "
            f"| {lim['cpu_ms_per_image']:.3f} | {r['cpu']['server_cpu_ms_per_request']:.3f} |"
        )
    return lines


def _targets_table(targets: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| target | model | measured | per round | bound | result | other CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in targets:
        verdict = "pass" if t["passed"] else "**miss**"
        values = ", ".join(f"{v:g}" for v in t.get("values", [t["measured"]]))
        lines.append(
            f"| {t['target']} | {t['model']} | {t['measured']} | {values} | {t['bound']} "
            f"| {verdict} | {_other(t['other_cores_max'])} |"
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The steps table, the in-process stage breakdown and the targets, as Markdown."""
    m = results["machine"]
    state = results["machine_state"]["before"]
    lines = [
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} CPUs, {m['memory_gib']} GiB, "
        f"torch {m['packages']['torch']} ({m['torch_threads']} threads), "
        f"busy cores before the run: {state['busy_cores']}; wall {results['wall_s']} s.",
        "",
        *_steps_table(results["steps"]),
        "",
        f"Bold 'other CPU': other processes used more than {CONTENDED_CORES} cores during the "
        "step or its in-process limit, so its numbers reflect a shared machine.",
        "",
        "In-process stage times (ms per image) behind each limit:",
        "",
        *_stages_table(results["steps"]),
        "",
        *_targets_table(results.get("targets", [])),
    ]
    return "\n".join(lines) + "\n"


def write_all(results: dict[str, Any], out: Path, *, plot: bool = True) -> list[Path]:
    """results.json, results.md, machine.json and (unless disabled) results.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "machine.json"]
    clean = jsonable(results)
    paths[0].write_text(json.dumps(clean, indent=1) + "\n")
    paths[1].write_text(markdown(clean))
    machine = {"machine": clean["machine"], "machine_state": clean["machine_state"]}
    paths[2].write_text(json.dumps(machine, indent=1) + "\n")
    if plot:
        paths.append(plot_results(clean, out / "results.png"))
    return paths


def _series(rows: list[dict[str, Any]], key: str, **match: Any) -> tuple[list, list]:
    picked = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    picked.sort(key=lambda r: r[key] or 0)
    return [r[key] for r in picked], picked


def _sweep_panels(axes: Any, rows: list[dict[str, Any]]) -> None:
    """Throughput (with the in-process limit dashed) and p50/p99 against concurrency."""
    thr, lat = axes
    for i, model in enumerate(dict.fromkeys(r["model"] for r in rows if r["group"] == "sweep")):
        xs, picked = _series(rows, "concurrency", group="sweep", model=model)
        color = f"C{i % 10}"
        thr.plot(xs, [r["throughput_rps"] for r in picked], "o-", color=color, label=model)
        thr.plot(xs, [r["limit"]["limit_rps"] for r in picked], "x--", color=color, alpha=0.6)
        lat.plot(xs, [r["latency_ms"]["p50"] for r in picked], "o-", color=color, label=model)
        lat.plot(xs, [r["latency_ms"]["p95"] for r in picked], "^:", color=color, alpha=0.6)
        lat.plot(xs, [r["latency_ms"]["p99"] for r in picked], "s--", color=color, alpha=0.6)
    thr.set(title="Throughput (solid) vs in-process limit (dashed)", xscale="log", ylabel="req/s")
    lat.set(title="Latency p50 (o), p95 (^), p99 (s)", xscale="log", yscale="log", ylabel="ms")
    for ax in axes:
        ax.set_xlabel("concurrency (closed loop)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)


def _variant_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    """p50 and throughput against concurrency: batch delays and instance counts on one model."""
    model = next((r["model"] for r in rows if r["group"] == "variants"), None)
    found = {(r["delay_ms"], r.get("instances", 0)) for r in rows if r["group"] == "variants"}
    if not found:
        ax.set_title("delay / instance variants: not run")
        return
    twin = ax.twinx()
    for i, (delay, instances) in enumerate(sorted(found, key=str)):
        match = {"group": "variants", "delay_ms": delay, "instances": instances}
        xs, picked = _series(rows, "concurrency", **match)
        label = f"delay {delay:g} ms, " + (
            f"{instances} instance(s)" if instances else "default instances"
        )
        ax.plot(xs, [r["latency_ms"]["p50"] for r in picked], "o-", color=f"C{i}", label=label)
        twin.plot(xs, [r["throughput_rps"] for r in picked], "s--", color=f"C{i}", alpha=0.6)
    ax.set(title=f"{model}: p50 (solid, left), req/s (dashed, right)", xscale="log")
    ax.set(xlabel="concurrency", ylabel="p50 ms", yscale="log")
    twin.set_ylabel("req/s")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _open_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Open loop: achieved rate and latency percentiles against the offered rate."""
    xs, picked = _series(rows, "rate", group="open", concurrency=None)
    if not picked:
        ax.set_title("open loop: not run")
        return
    ax.plot(xs, [r["latency_ms"]["p50"] for r in picked], "o-", label="p50 ms")
    ax.plot(xs, [r["latency_ms"]["p99"] for r in picked], "s--", label="p99 ms")
    title = f"Open loop ({picked[0]['arrival']} arrivals, {picked[0]['model']})"
    ax.set(title=title, xlabel="offered req/s", ylabel="ms", yscale="log")
    twin = ax.twinx()
    twin.plot(xs, [r["throughput_rps"] for r in picked], "k^:", label="achieved req/s")
    twin.set_ylabel("achieved req/s")
    ax.legend(fontsize=7, loc="upper left")
    twin.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)


def plot_results(results: dict[str, Any], path: Path) -> Path:
    """A 2x2 figure: sweep throughput, sweep latency, delay/thread variants, open loop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["steps"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    _sweep_panels(axes[0], rows)
    _variant_panel(axes[1][0], rows)
    _open_panel(axes[1][1], rows)
    machine = results["machine"]
    fig.suptitle(
        f"attnserve benchmark - {machine['cpu_model']}, {machine['usable_cpus']} CPUs, "
        f"torch {machine['packages']['torch']}, {results['created']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
