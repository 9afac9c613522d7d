"""Process tuning that earned its place in the benchmark: one module, each piece behind a setting.

`keep_freed_memory` (ATTNSERVE_MALLOC_KEEP_FREED, on by default for CPU serving): glibc's malloc
otherwise unmaps each multi-megabyte activation buffer when it is freed, so every forward pass
faults its pages in again. Keeping them cut the server's CPU per request by more than 10 % at
c=64 (docs/performance.md, "glibc malloc keeps freed activation buffers").

`inline_max_bytes` (ATTNSERVE_INLINE_MAX_BYTES, 64 KiB by default): the pipeline decodes a
request's only image when it is small, and encodes a small answer, on the event loop instead of
handing them to a CPU pool thread, whose hand-off costs the loop more than such work does
(docs/performance.md, "Small work on the event loop"). `INLINE_MAX_PIXELS` bounds the images it
decodes there.

`settle_gc` (ATTNSERVE_GC_FREEZE, on by default): once the models are loaded, the garbage
collector stops walking the long-lived objects of torch, the models and the web stack on the
request path (docs/performance.md, "The garbage collector after loading").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

__all__ = ["INLINE_MAX_PIXELS", "YOUNG_GC_THRESHOLD", "keep_freed_memory", "settle_gc"]

logger = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h): serve blocks up to 32 MiB from the heap, trim the heap
# only above 256 MiB free, and grow it 64 MiB at a time.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOC_SETTINGS = (
    (_M_MMAP_THRESHOLD, 32 * 2**20),
    (_M_TRIM_THRESHOLD, 256 * 2**20),
    (_M_TOP_PAD, 64 * 2**20),
)


def keep_freed_memory() -> bool:
    """Let glibc keep freed activation buffers for the next batch; False where there is no
    glibc `mallopt` (the process then runs with its allocator's defaults)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        logger.info("no glibc mallopt: freed memory is returned as the allocator decides")
        return False
    return all(mallopt(param, value) == 1 for param, value in _MALLOC_SETTINGS)


INLINE_MAX_PIXELS = 256 * 256
"""The largest image decoded on the event loop (a larger one is refused there before any pixel
is decoded, and goes to the CPU pool)."""

YOUNG_GC_THRESHOLD = 10_000
"""Net allocations between young-generation collections (Python's default, 700, runs one every
request or two on the web stack's allocations)."""


def settle_gc() -> None:
    """Collect once, move every surviving object into the permanent generation (`gc.freeze`),
    and collect the young generation less often. After loading, the process holds a few hundred
    thousand objects that live until exit; each full collection would walk all of them holding
    the GIL, while the event loop and the device threads wait. Called again after every model
    load or unload: what was frozen before is collected again first, so an unloaded model's
    reference cycles are freed."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)
