"""`python -m bench.mapwork`: every case is timed and printed, and both map writers agree."""

from __future__ import annotations

import re

import pytest

from bench.mapwork import main, measure


def test_measure_times_every_case() -> None:
    results = measure("digits-coordatt", batch=2, rounds=1, repeats=1)
    upsampling = [case for case in results if case.startswith("upsample ")]
    assert len(upsampling) == 6  # three view grids (32, 16, 8), two ways each
    assert {"maps as numbers, then orjson", "maps as JSON text"} <= set(results)
    assert all(value > 0 for value in results.values())


def test_main_prints_microseconds_per_image(capsys: pytest.CaptureFixture[str]) -> None:
    main(["digits-cbam", "--batch", "2", "--rounds", "1", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "digits-cbam, batch 2, one thread: microseconds per image"
    assert len(lines) == 9 and all(re.search(r"\s[\d.]+$", line) for line in lines[1:])
