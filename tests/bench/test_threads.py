"""`python -m bench.threads` on a real server, and the thread naming it relies on (Linux)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from bench.threads import _gc_collections, main, sample_threads
from service.worker import name_os_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_name_os_thread_gives_the_os_thread_the_python_name() -> None:
    names: list[str] = []

    def run() -> None:
        name_os_thread()
        names.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text())

    thread = threading.Thread(target=run, name="attnserve-longer-than-15")
    thread.start()
    thread.join()
    assert names == ["attnserve-longe\n"]


def test_sample_threads_counts_this_threads_cpu() -> None:
    me = threading.get_native_id()
    before = sample_threads(os.getpid())[me]
    end = before.cpu_s + 0.2
    while sample_threads(os.getpid())[me].cpu_s < end:
        sum(range(10_000))
    after = sample_threads(os.getpid())[me]
    assert after.cpu_s >= before.cpu_s + 0.2
    assert after.switches >= before.switches and after.runqueue_wait_s >= before.runqueue_wait_s


def test_bench_threads_names_the_server_threads(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--model", "digits-none", "--concurrency", "4", "--duration", "1", "--warmup", "0.5",
          "--server-env", "ATTNSERVE_INSTANCES=2"])  # fmt: skip
    out = capsys.readouterr().out
    assert "digits-none c=4" in out
    rows = {line.split(":")[0] for line in out.splitlines() if ":" in line.split()[0]}
    assert {"device-cpu_0", "device-cpu_1", "attnserve-cpu_0"} <= rows
    assert "attnserve_batch_size: mean" in out
    assert "garbage collections by generation: gen0 " in out


def test_gc_collections_between_two_scrapes() -> None:
    def scrape(*counts: int) -> str:
        return "".join(
            f'python_gc_collections_total{{generation="{gen}"}} {n}.0\n'
            for gen, n in enumerate(counts)
        )

    assert _gc_collections(scrape(10, 2, 1), scrape(15, 2, 3)) == "gen0 5, gen1 0, gen2 2"
