"""A short real run of the benchmark (server process, load, in-process limit, report files), so
the benchmark cannot silently rot; plus the pure helpers it relies on."""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
from pathlib import Path

import pytest

from bench.loadgen import arrival_times
from bench.report import evaluate_targets
from bench.run import main
from bench.server import batch_stats, parse_metrics

MODEL = "resnet_small-cbam-random"
CPU_FIELDS = {
    "server_cores",
    "client_cores",
    "client_share",
    "other_cores",
    "server_cpu_ms_per_request",
    "client_cpu_ms_per_request",
    "server_overhead_cpu_ms",
}
METRICS_BEFORE = """
# HELP attnserve_batch_size Images per forward pass.
attnserve_batch_size_bucket{le="1.0",model="m"} 2.0
attnserve_batch_size_bucket{le="2.0",model="m"} 2.0
attnserve_batch_size_bucket{le="4.0",model="m"} 2.0
attnserve_batch_size_bucket{le="+Inf",model="m"} 2.0
attnserve_batch_size_count{model="m"} 2.0
attnserve_batch_size_sum{model="m"} 2.0
"""
METRICS_AFTER = """
attnserve_batch_size_bucket{le="1.0",model="m"} 3.0
attnserve_batch_size_bucket{le="2.0",model="m"} 4.0
attnserve_batch_size_bucket{le="4.0",model="m"} 6.0
attnserve_batch_size_bucket{le="+Inf",model="m"} 6.0
attnserve_batch_size_count{model="m"} 6.0
attnserve_batch_size_sum{model="m"} 12.0
"""


def test_batch_stats_takes_the_difference_between_two_scrapes() -> None:
    stats = batch_stats(parse_metrics(METRICS_BEFORE), parse_metrics(METRICS_AFTER), "m")
    assert stats == {
        "batches": 4,
        "images": 10,
        "mean": 2.5,
        "histogram": {"<=1": 1, "<=2": 1, "<=4": 2},
    }


def test_batch_stats_of_a_server_that_formed_no_batch_yet() -> None:
    # A server starved by other load may not have run a forward pass by the end of a step.
    stats = batch_stats({}, parse_metrics("# no samples yet\n"), "m")
    assert stats == {"batches": 0, "images": 0, "mean": 0.0, "histogram": {}}


def test_arrival_times_are_bounded_and_near_the_rate() -> None:
    fixed = arrival_times(100.0, 2.0, "fixed")
    assert len(fixed) == 200 and fixed[1] - fixed[0] == pytest.approx(0.01)
    poisson = arrival_times(100.0, 20.0, "poisson", seed=1)
    assert all(b > a for a, b in itertools.pairwise(poisson))
    assert poisson[0] >= 0 and poisson[-1] < 20.0
    assert 1800 < len(poisson) < 2200
    with pytest.raises(ValueError, match="arrival"):
        arrival_times(1.0, 1.0, "bursty")


def _check_row(row: dict) -> None:
    """What holds however busy the machine is: a starved server may answer nothing inside a
    one-second window, but it never answers with an error."""
    assert row["error_count"] == 0
    if row["requests_ok"]:
        lat = row["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert row["response_bytes_mean"] > 100
    batch = row["batch"]
    assert sum(batch["histogram"].values()) == batch["batches"]
    assert batch["images"] >= batch["batches"]  # every batch holds an image
    assert set(row["cpu"]) == CPU_FIELDS
    limit = row["limit"]
    assert limit["batch_size"] == max(1, round(row["batch"]["mean"]))
    assert limit["rounds"] >= 3  # min_rounds, whatever the budget
    # --torch-threads 2: one device thread with both, and when the server runs 2 instances
    # also two side-by-side pipelines with one each; the faster is the limit.
    assert set(limit["modes"]) == ({"1x2", "2x1"} if row["instances"] == 2 else {"1x2"})
    assert limit["modes"][limit["mode"]] == max(limit["modes"].values())
    assert limit["torch_threads"] == int(limit["mode"].split("x")[1])
    assert limit["instances"] == int(limit["mode"].split("x")[0])
    assert limit["fastest_round_ms"] <= limit["round_ms_median"]  # the minimum over the modes
    # The median of the three parts is the limit.
    assert len(limit["repeat_rps"]) == 3
    assert sorted(limit["repeat_rps"])[1] == round(limit["limit_rps"], 2)
    stages = limit["ms_per_image"]
    names = ("decode_preprocess", "forward", "maps", "build", "encode")
    assert all(stages[k] > 0 for k in names)
    parts = sum(stages[k] for k in names)
    assert math.isclose(parts, stages["total"], rel_tol=1e-3)
    assert row["limit_ratio"] == pytest.approx(row["throughput_rps"] / limit["limit_rps"])


@pytest.mark.slow
def test_smoke_run_writes_sane_results(tmp_path: Path) -> None:
    # Random weights (the --arch path used for GPU hosts), so the zoo's state does not matter.
    argv = ["--arch", "resnet_small", "--attention", "cbam", "--inputs", "digits"]
    argv += ["--concurrency", "1,4", "--duration", "1"]
    argv += ["--warmup", "0.2", "--limit-seconds", "0.05"]
    argv += ["--groups", "sweep,maps,open,rounds,instances", "--max-batch-size", "8"]
    argv += ["--rounds", "2"]
    argv += ["--maps-levels", "none,all", "--open-rates", "0.5"]
    argv += ["--torch-threads", "2", "--instances", "2", "--compare-instances", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["schema"] == 1 and results["command"].startswith("python -m bench.run --arch")
    assert results["models"] == [
        {"name": MODEL, "arch": "resnet_small", "attention": "cbam", "weights": "random"}
    ]
    assert results["machine"]["usable_cpus"] == len(os.sched_getaffinity(0))
    steps = results["steps"]
    keys = [(r["group"], r["concurrency"], r["maps"]) for r in steps]
    assert keys == [
        ("sweep", 1, "summary"),
        ("sweep", 4, "summary"),
        ("maps", 1, "none"),
        ("maps", 4, "none"),
        ("maps", 1, "all"),
        ("maps", 4, "all"),
        ("open", None, "summary"),
        # two rounds of the target steps
        *[
            ("rounds", 1, "summary"),
            ("rounds", 4, "summary"),
            ("rounds", 4, "none"),
            ("rounds", 4, "all"),
        ]
        * 2,
        ("variants", 1, "summary"),
        ("variants", 1, "summary"),
        ("variants", 4, "summary"),
        ("variants", 4, "summary"),
    ]
    assert [r["instances"] for r in steps[-4:]] == [2, 1, 2, 1]
    assert [s["settings"]["instances"] for s in results["servers"]] == ["2", "1"]
    for row in steps:
        _check_row(row)
    sizes = {
        maps: statistics.mean(
            r["response_bytes_mean"] for r in steps if r["maps"] == maps and r["requests_ok"]
        )
        for maps in ("none", "summary", "all")
    }
    assert sizes["none"] < sizes["summary"] < sizes["all"]
    # Open loop at half the c=4 sweep's throughput (at least 10 arrivals per window); what it
    # sends follows the arrival schedule alone, whatever the server answers.
    open_row = steps[6]
    assert open_row["arrival"] == "poisson"
    assert open_row["rate"] == round(max(0.5 * steps[1]["throughput_rps"], 10.0), 1)
    schedule = arrival_times(open_row["rate"], 0.2 + 1.0, "poisson")  # --warmup + --duration
    assert open_row["requests_sent"] == sum(t >= 0.2 for t in schedule)

    names = [t["target"] for t in results["targets"]]
    assert len(names) == 3
    for part in ("c=4 throughput / in-process limit", "c=1 p50 minus", "maps=all throughput"):
        assert sum(name.startswith(part) for name in names) == 1, (part, names)
    for target in results["targets"]:
        assert isinstance(target["passed"], bool) and isinstance(target["contended"], bool)
        assert target["model"] == MODEL
        # judged on the two rounds: the median of two is their mean (None, JSON's NaN, when a
        # round's step answered nothing)
        values = target["values"]
        assert len(values) == 2
        if None in values:
            assert target["measured"] is None
        else:
            assert target["measured"] == pytest.approx(sum(values) / 2, abs=1e-3)
    assert "| target |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "machine.json").read_text())["machine"]["cpu_model"]


def _row(group: str, c: int, maps: str, rps: float, ratio: float = 0.5, p50: float = 9.0) -> dict:
    limit = {"batch_size": 4, "fastest_round_ms": 5.0, "round_ms_median": 6.0, "other_cores": 0}
    return {
        "group": group,
        "model": "m",
        "concurrency": c,
        "maps": maps,
        "throughput_rps": rps,
        "limit_ratio": ratio,
        "latency_ms": {"p50": p50},
        "limit": limit,
        "cpu": {"other_cores": 0.0},
    }


def test_targets_take_the_median_over_rounds_and_pair_maps_steps_by_round() -> None:
    sweep = [_row("sweep", 1, "summary", 100, p50=20.0), _row("sweep", 64, "summary", 800, 0.5)]
    maps = [_row("maps", 64, "none", 1000), _row("maps", 64, "all", 100)]
    rounds = []
    for ratio, p50, none, full in (
        (0.9, 7.0, 1000, 900),
        (0.8, 9.0, 500, 400),
        (0.7, 6.0, 800, 760),
    ):
        rounds += [
            _row("rounds", 1, "summary", 100, p50=p50),
            _row("rounds", 64, "summary", 800, ratio),
            _row("rounds", 64, "none", none),
            _row("rounds", 64, "all", full),
        ]
    config = {"config": {"concurrency": [1, 64]}}
    got = {
        t["target"].split(" ")[0]: t
        for t in evaluate_targets({**config, "steps": sweep + maps + rounds})
    }
    assert got["c=64"]["values"] == [0.9, 0.8, 0.7] and got["c=64"]["measured"] == 0.8
    assert got["c=64"]["passed"] is False and "median of 3 rounds" in got["c=64"]["target"]
    assert got["c=1"]["values"] == [2.0, 4.0, 1.0] and got["c=1"]["measured"] == 2.0
    # each round's all against the same round's none: 0.1, 0.2, 0.05 -> 0.1
    assert got["maps=all"]["values"] == [0.1, 0.2, 0.05] and got["maps=all"]["measured"] == 0.1
    assert got["maps=all"]["passed"] is True
    # without rounds: the sweep's and the maps group's single steps
    single = {
        t["target"].split(" ")[0]: t for t in evaluate_targets({**config, "steps": sweep + maps})
    }
    assert single["c=64"]["measured"] == 0.5 and single["c=1"]["measured"] == 15.0
    assert single["maps=all"]["measured"] == 0.9 and single["maps=all"]["values"] == [0.9]
