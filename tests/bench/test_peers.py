"""bench.peers' own logic, without starting a peer: server specs, the config.json attnserve is
given (read back by service.model_config), answer comparison, the access-log summary, the
table, and a peer skipped with its reason when its environment is missing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench.peer_servers import LitServer, PeerSkipped, TorchServer
from bench.peers import compare, main, predictions, summarise_access, table
from bench.peerserve import AttnServer, parse_spec
from service.model_config import config_from_json


def test_specs_are_parsed_and_typos_refused() -> None:
    assert parse_spec("attnserve") == ("attnserve", {})
    assert parse_spec("litserve+workers=2+batch=16") == (
        "litserve",
        {"workers": "2", "batch": "16"},
    )
    with pytest.raises(ValueError, match="unknown kind 'triton'"):
        parse_spec("triton")
    with pytest.raises(ValueError, match="'autocast=bf16' is not key=value with a key of"):
        parse_spec("torchserve+autocast=bf16")
    with pytest.raises(ValueError, match="not key=value"):
        parse_spec("attnserve+workers")


def test_attnserve_options_become_a_config_json_the_service_reads(tmp_path: Path) -> None:
    args = argparse.Namespace(workdir=tmp_path)
    spec = "attnserve+autocast=bf16+max_batch_size=4+delay_ms=2.5+instances=1"
    server = AttnServer(spec, parse_spec(spec)[1], {}, args)
    config = config_from_json(json.dumps(server.config_json()), "m")
    assert (config.autocast, config.max_batch_size, config.instances) == ("bf16", 4, 1)
    assert config.max_batch_delay_ms == 2.5
    assert AttnServer("attnserve", {}, {}, args).config_json() == {}


def test_answers_of_both_shapes_are_compared_with_the_reference() -> None:
    top = [{"label": f"c{i}", "index": i, "probability": p} for i, p in ((3, 0.5), (1, 0.2))]
    ours = json.dumps({"model": "m", "results": [{"predictions": top}]}).encode()
    peer = json.dumps({"predictions": top}).encode()
    assert predictions(ours) == predictions(peer) == top
    assert compare(top, [(3, 0.5), (1, 0.2)]) == (True, 0.0)
    same, diff = compare(top, [(1, 0.3), (3, 0.49)])
    assert not same and diff == pytest.approx(0.1)
    assert compare(top, [(7, 0.9)]) == (False, float("inf"))


def test_access_summary_points_at_the_slow_requests() -> None:
    records = [
        {"latency_ms": 100.0 + i, "queue_ms": 10.0, "batch_size": 1 + i % 2} for i in range(99)
    ]
    records.append({"latency_ms": 900.0, "queue_ms": 500.0, "batch_size": 7})
    summary = summarise_access(records)
    assert summary["requests"] == 100
    assert summary["batch_sizes"] == {1: 50, 2: 49, 7: 1}
    assert summary["slowest"][-1] == {
        "latency_ms": 900.0,
        "queue_ms": 500.0,
        "serve_ms": 400.0,
        "batch_size": 7,
    }
    assert summary["queue_ms"]["p50"] == 10.0
    assert summarise_access([]) == {}


def test_table_gives_each_servers_median_over_rounds() -> None:
    def step(rps: float, p99: float) -> dict:
        return {"rps": rps, "p50": p99 / 2, "p90": p99 * 0.9, "p99": p99, "errors": 0}

    check = {"top1": 1.0, "max_diff": 1e-6}
    rounds = [
        {("m", 8): step(r, p), ("m", "check"): check} for r, p in ((10, 900), (12, 700), (11, 800))
    ]
    lines = table({"attnserve": rounds}, ["m"], [8])
    assert lines[2].startswith("| m | 8 | attnserve | 11.0 | 400 | 720 | 800 |")


def test_a_peer_without_its_environment_is_skipped_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(peers_venv=tmp_path / "none", workdir=tmp_path)
    for cls in (LitServer, TorchServer):
        with pytest.raises(PeerSkipped, match="no virtual environment at"):
            cls("peer", {}, {}, args).check_installed()
    venv = ["--peers-venv", str(tmp_path / "none"), "--workdir", str(tmp_path)]
    assert main(["--servers", "litserve,torchserve+workers=2", *venv]) == 0
    out = capsys.readouterr().out
    assert "skipping litserve: no virtual environment at" in out
    assert "skipping torchserve+workers=2: no virtual environment at" in out
    assert "no server to measure" in out
