"""`python -m bench.floor`: a short run against the bare uvicorn server it starts."""

from __future__ import annotations

import re
import sys

import pytest

from bench.floor import main

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_bench_floor_reports_the_event_loops_cpu_per_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["--concurrency", "4", "--duration", "1", "--warmup", "0.5", "--delay-ms", "5",
          "--burners", "1"])  # fmt: skip
    out = capsys.readouterr().out
    served = re.search(r"floor c=4 delay 5 ms, 1 burners: ([\d.]+) req/s, (\d+) answered", out)
    assert served is not None, out
    assert int(served.group(2)) > 50  # 4 connections, 5 ms each, for a second
    loop = re.search(r"event loop: ([\d.]+) cores, ([\d.]+) ms/req; burners: ([\d.]+) cores", out)
    assert loop is not None, out
    assert float(loop.group(2)) > 0  # the loop parsed and answered every request
    assert float(loop.group(3)) > 0.5  # the burner kept a core busy
