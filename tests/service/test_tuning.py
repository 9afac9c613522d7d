"""The process tuning that stays (service.tuning), checked by what it changes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_FAULTS_SCRIPT = """
import resource, sys, torch
from models import create_model
from service.tuning import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
torch.manual_seed(0)
model = create_model("resnet_small", attention="cbam", num_classes=10, in_chans=1).eval()
x = torch.rand(13, 1, 64, 64)
with torch.inference_mode():
    model(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        model(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_stops_page_faults_on_every_batch() -> None:
    """20 forwards of a digits-sized model at batch 13: with glibc's defaults the activation
    buffers are faulted in anew on every pass; kept, they are reused. Page faults are counted,
    not timed, so the machine's load does not change them."""

    def faults(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        return int(done.stdout.strip())

    default, tuned = faults("default"), faults("tuned")
    assert default > 10_000
    assert tuned < default / 10


_GC_SCRIPT = """
import gc, sys, torch, weakref
from models import create_model
from service.tuning import YOUNG_GC_THRESHOLD, settle_gc
model = create_model("resnet_small", attention="cbam", num_classes=10, in_chans=1)
class Cycle:
    pass
gc.disable()  # nothing collects but settle_gc
junk = Cycle(); junk.me = junk; gone = weakref.ref(junk); del junk  # only a collection frees it
assert gone() is not None
settle_gc()
assert gc.get_threshold()[0] == YOUNG_GC_THRESHOLD
frozen = gc.get_freeze_count()
assert gone() is None  # collected, not frozen
unloaded = Cycle(); unloaded.me = unloaded; unloaded_gone = weakref.ref(unloaded)
settle_gc()  # alive now: frozen
del unloaded  # a later unload drops it
assert unloaded_gone() is not None
settle_gc()  # settling again collects what was frozen before and is garbage now
assert unloaded_gone() is None
print(frozen, gc.get_freeze_count(), len(gc.get_objects()))
"""


def test_settle_gc_freezes_what_lives_and_collects_the_rest() -> None:
    """After settling, the loaded model's objects sit in the permanent generation (out of every
    collection's walk), reference cycles left over were collected rather than frozen, and the
    young generation runs less often; settling again after an unload frees the cycles that
    were frozen while alive."""
    done = subprocess.run(
        [sys.executable, "-c", _GC_SCRIPT], capture_output=True, text=True, check=True
    )
    frozen, frozen_again, tracked = map(int, done.stdout.split())
    assert frozen > 10_000  # torch and the model's modules and parameters
    assert frozen_again >= frozen
    assert tracked < frozen_again / 10  # what the collector still walks
