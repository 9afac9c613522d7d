"""`python -m bench.handoff`: both hand-offs are timed and printed."""

from __future__ import annotations

import re

import pytest

from bench.handoff import main, measure


def test_measure_times_both_hand_offs() -> None:
    times = measure(callers=4, calls=400)
    assert set(times) == {"run_in_executor", "CpuPool.call"}
    assert all(cpu > 0 and wall > 0 for cpu, wall in times.values())


def test_main_prints_microseconds_per_call(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--callers", "2", "--calls", "200"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["run_in_executor", "CpuPool.call"]
    assert all(re.search(r"[\d.]+ us CPU, +[\d.]+ us wall per call", line) for line in lines)
