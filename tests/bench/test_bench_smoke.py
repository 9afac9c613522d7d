"""A short real run of the benchmark (server process, load, in-process limit, report files), so
the benchmark cannot silently rot; plus the pure helpers it relies on."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from bench.loadgen import arrival_times
from bench.run import main
from bench.server import batch_stats, parse_metrics

MODEL = "resnet_small-cbam-random"
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
    lat = row["latency_ms"]
    assert row["throughput_rps"] > 0 and row["requests_ok"] > 0
    assert row["error_count"] == 0 and row["drops"] == 0
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert row["batch"]["batches"] >= 1 and row["batch"]["mean"] >= 1
    assert sum(row["batch"]["histogram"].values()) == row["batch"]["batches"]
    assert row["response_bytes_mean"] > 100
    assert row["cpu"]["server_cores"] > 0 and 0 <= row["cpu"]["client_share"] <= 1
    limit = row["limit"]
    assert limit["batch_size"] == max(1, round(row["batch"]["mean"]))
    assert limit["limit_rps"] > 0 and limit["rounds"] >= 3
    # --torch-threads 2: one device thread with both, and when the server runs 2 instances
    # also two side-by-side pipelines with one each; the faster is the limit.
    assert set(limit["modes"]) == ({"1x2", "2x1"} if row["instances"] == 2 else {"1x2"})
    assert limit["modes"][limit["mode"]] == max(limit["modes"].values())
    assert limit["torch_threads"] == int(limit["mode"].split("x")[1])
    assert limit["instances"] == int(limit["mode"].split("x")[0])
    assert 0 < limit["fastest_round_ms"] <= limit["round_ms_median"]
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
    argv += ["--groups", "sweep,maps,open,instances", "--max-batch-size", "8"]
    argv += ["--maps-levels", "none,all", "--open-rates", "0.5"]
    argv += ["--torch-threads", "2", "--instances", "2", "--compare-instances", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["schema"] == 1 and results["command"].startswith("python -m bench.run --arch")
    assert results["models"] == [
        {"name": MODEL, "arch": "resnet_small", "attention": "cbam", "weights": "random"}
    ]
    assert results["machine"]["usable_cpus"] >= 1 and results["machine"]["torch_threads"] >= 1
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
        ("variants", 1, "summary"),
        ("variants", 1, "summary"),
        ("variants", 4, "summary"),
        ("variants", 4, "summary"),
    ]
    assert [r["instances"] for r in steps[-4:]] == [2, 1, 2, 1]
    assert [s["settings"]["instances"] for s in results["servers"]] == ["2", "1"]
    for row in steps:
        _check_row(row)
    by_maps = {r["maps"]: r["response_bytes_mean"] for r in steps if r["concurrency"] == 1}
    assert by_maps["none"] < by_maps["summary"] < by_maps["all"]
    open_row = steps[6]
    assert open_row["rate"] > 0 and open_row["offered_rps"] > 0 and open_row["arrival"]

    names = [t["target"] for t in results["targets"]]
    assert len(names) == 3
    for part in ("c=4 throughput / in-process limit", "c=1 p50 minus", "maps=all throughput"):
        assert sum(name.startswith(part) for name in names) == 1, (part, names)
    for target in results["targets"]:
        assert isinstance(target["passed"], bool) and isinstance(target["contended"], bool)
        assert target["model"] == MODEL and math.isfinite(target["measured"])
    assert "| target |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "machine.json").read_text())["machine"]["cpu_model"]


def test_gil_comparison_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m bench.gil` measures all four cases (tiny batch, one round: no timing claims)."""
    import bench.gil

    monkeypatch.setattr(bench.gil, "BATCH", 2)
    monkeypatch.setattr(bench.gil, "ROUNDS", 1)
    results = bench.gil._measure("digits-none")
    assert set(results) == {
        "eager alone",
        "traced alone",
        "eager + GIL-busy thread",
        "traced + GIL-busy thread",
    }
    assert all(ms > 0 for ms in results.values())


def test_gil_full_collection_measures_the_settled_collector() -> None:
    """bench.gil's last line: a full collection over the loaded stack, then after settle_gc
    (which freezes the objects alive then; the fixture in conftest.py undoes it)."""
    import gc

    import bench.gil

    tracked, before, after = bench.gil._full_collection_ms()
    assert tracked > 50_000  # torch and the web stack: the walk that settle_gc removes
    assert gc.get_freeze_count() > 50_000
    assert before > 0 and after > 0
