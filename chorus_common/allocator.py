"""The C allocator's settings for long-running servers.

glibc serves an allocation of at least its mmap threshold (128 KiB at first) with a mapping of its own,
returned to the system when freed; but each such free raises the threshold to that size (up to 32 MiB).
After the first full distribution is freed (262,144 floats for Gemma 3: 1 MiB), the next ones come from
the heap and its per-thread arenas, whose holes are seldom given back: a server's resident memory then
creeps for minutes under load (measured with scripts/load_test.py: the coordinator's floor grew from 180
to 335 MB in 65 s, against 151 to 170 MB with the threshold fixed). Setting the threshold fixes it, as
MALLOC_MMAP_THRESHOLD_ does, and stops the adjustment.

Loading leaves the heap full of holes too (a tokenizer's JSON parsed into Python objects, then freed):
`give_back_free_memory` returns them once loading is over.

A model in bfloat16 on a CPU runs its matrix products through oneDNN, which compiles a kernel for each
new shape and keeps up to 1,024 of them, with buffers, in two caches (oneDNN's and PyTorch's); a worker
meets a new shape at nearly every step (its attention's key lengths grow), so it grows by hundreds of MB
(measured with scripts/load_test.py: Gemma 3's worker from 1,061 to 1,526 MB in ten minutes).
`bound_onednn_caches` keeps 64 of each (ONEDNN_PRIMITIVE_CACHE_CAPACITY, LRU_CACHE_CAPACITY): the same
load test then stays level at the same speed (docs/load-test.md); float32 on a CPU does not use them.

float32 matrix products on a CPU run through MKL, whose own allocator keeps the work buffers of every product
it ran for the next one: a pass's output layer over Gemma 3's 262,144 tokens and the layers below it left
about 16 MB held for good. `disable_mkl_buffer_cache` (MKL_DISABLE_FAST_MM) makes MKL allocate and free them
as it goes: the same results bit for bit, at the same speed (measured: a 32-session Gemma 3 decode pass,
364-368 ms against 381-388 ms with the cache; docs/load-test.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 256 * 1024
ONEDNN_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, PyTorch's
ONEDNN_CACHE_CAPACITY = 64
MKL_BUFFER_CACHE = "MKL_DISABLE_FAST_MM"


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has mallopt and malloc_trim; musl has neither), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - present only in glibc
    except (OSError, AttributeError):
        return None
    return libc


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (unless MALLOC_MMAP_THRESHOLD_ already does); whether it was set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")
        return False
    return True


def give_back_free_memory() -> bool:
    """Collect garbage, then hand the heap's free pages back to the system (glibc's malloc_trim); whether
    anything was given back."""
    gc.collect()
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> dict[str, str]:
    """Cap oneDNN's and PyTorch's per-shape kernel caches (each left as it is where the environment sets it);
    call before torch first runs a model. Returns the variables as they now are."""
    for name in ONEDNN_CACHES:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in ONEDNN_CACHES}


def disable_mkl_buffer_cache() -> str:
    """Have MKL free its work buffers after each product instead of keeping them (left as it is where the
    environment sets MKL_DISABLE_FAST_MM); call before torch first runs a model. Returns the variable's value."""
    return os.environ.setdefault(MKL_BUFFER_CACHE, "1")
