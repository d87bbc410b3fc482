"""The C allocator's settings for long-running servers.

glibc serves an allocation of at least its mmap threshold (128 KiB at first) with a mapping of its own,
returned to the system when freed; but each such free raises the threshold to that size (up to 32 MiB).
After the first full distribution is freed (262,144 floats for Gemma 3: 1 MiB), the next ones come from
the heap and its per-thread arenas, whose holes are seldom given back: a server's resident memory then
creeps for minutes under load (measured with scripts/load_test.py: the coordinator's floor grew from 180
to 335 MB in 65 s, against 151 to 170 MB with the threshold fixed). Setting the threshold fixes it, as
MALLOC_MMAP_THRESHOLD_ does, and stops the adjustment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 256 * 1024


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (unless MALLOC_MMAP_THRESHOLD_ already does); whether it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return False
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")
        return False
    return True
