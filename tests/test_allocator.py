"""Server processes fix glibc's mmap threshold, so a freed full distribution (1 MiB for Gemma 3) no longer
lifts it: later buffers of that size stay mappings of their own, returned to the system when freed,
instead of filling the heap (docs/load-test.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A buffer freed, then a slightly smaller one: is the second a mapping of its own (mallinfo2's hblkhd)?
PROBE = """
import ctypes, sys
import numpy as np
from chorus_common import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
fixed = allocator.fix_mmap_threshold() if sys.argv[1] == "fix" else False
first = np.ones(262144, dtype=np.float32)
del first
before = libc.mallinfo2().hblkhd
second = np.ones(262144 - 16384, dtype=np.float32)
print(fixed, libc.mallinfo2().hblkhd - before >= second.nbytes)
"""


def _probe(mode: str, env: dict[str, str] | None = None) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return done.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_a_fixed_threshold_keeps_megabyte_buffers_out_of_the_heap() -> None:
    assert _probe("plain") == ["False", "False"]  # glibc's own rule: the freed buffer lifted the threshold
    assert _probe("fix") == ["True", "True"]
    # An operator's MALLOC_MMAP_THRESHOLD_ is left as it is.
    assert _probe("fix", {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4194304"})[0] == "False"


# 200 MB of malloc'd buffers (bytes over pymalloc's 512-byte limit) freed but for the last, which pins the
# heap's top: free() cannot shrink the heap past it; handing the free pages back must.
TRIM_PROBE = """
import sys
from chorus_common import allocator

def anon_mb():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) // 1024

buffers = [bytes(2000) + i.to_bytes(4, "little") for i in range(100_000)]
last = buffers[-1]
del buffers
before = anon_mb()
given = allocator.give_back_free_memory() if sys.argv[1] == "trim" else False
print(given, before - anon_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_free_heap_pages_are_given_back_after_loading() -> None:
    def probe(mode: str) -> tuple[str, int]:
        done = subprocess.run([sys.executable, "-c", TRIM_PROBE, mode], capture_output=True, text=True, check=True)
        given, freed = done.stdout.split()
        return given, int(freed)

    kept, not_freed = probe("keep")
    given, freed = probe("trim")
    assert kept == "False" and not_freed < 20  # free() alone kept the pages (the pinned top)
    assert given == "True"
    assert freed > 100, freed  # MB: the freed buffers' pages left the process


# bfloat16 matrix products of 400 shapes (a linear layer's rows, an attention's key lengths): oneDNN compiles
# and keeps a kernel per shape unless its caches are bounded.
ONEDNN_PROBE = """
import os, sys
from chorus_common import allocator
if sys.argv[1] == "bound":
    allocator.bound_onednn_caches()
import torch

def rss_mb():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Rss:"):
            return int(line.split()[1]) // 1024

torch.set_num_threads(1)
linear = torch.nn.Linear(512, 512, dtype=torch.bfloat16)
query = torch.randn(4, 1, 64, dtype=torch.bfloat16)
with torch.inference_mode():
    linear(torch.randn(1, 512, dtype=torch.bfloat16))
    before = rss_mb()
    for m in range(1, 400):
        linear(torch.randn(m, 512, dtype=torch.bfloat16))
        query @ torch.randn(4, 64, m, dtype=torch.bfloat16)
print(rss_mb() - before)
"""


def test_the_onednn_kernel_caches_are_bounded_unless_the_environment_sets_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from chorus_common import allocator

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "8")  # an operator's choice stands
    assert allocator.bound_onednn_caches() == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "8"}
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"


def _probe_mb(code: str, mode: str, env: dict[str, str]) -> int:
    """Run a probe script in a fresh interpreter (its allocator and BLAS untouched by this one); the MB it prints."""
    done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True, env=env)
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps_rollup")
def test_bounded_onednn_caches_keep_a_bfloat16_model_from_growing_with_each_new_shape() -> None:
    from chorus_common.allocator import ONEDNN_CACHES

    env = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHES}

    def grown_mb(mode: str) -> int:
        return _probe_mb(ONEDNN_PROBE, mode, env)

    free = grown_mb("free")
    if free < 200:
        pytest.skip(f"torch kept no per-shape kernels on this CPU (grew {free} MB): nothing to bound")
    bounded = grown_mb("bound")
    assert bounded < 150, (bounded, free)  # MB, against about 500 unbounded on the sandbox


# Float32 products the shape of Gemma 3's output layer over 1, 32 and 384 rows: what MKL's allocator still holds
# after them (glibc's mmapped chunks, mallinfo2's hblkhd, in MB).
MKL_PROBE = """
import ctypes, sys
from chorus_common import allocator
if sys.argv[1] == "disable":
    allocator.disable_mkl_buffer_cache()
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
allocator.fix_mmap_threshold()
torch.set_num_threads(1)
weight = torch.randn(262144, 640)
before = libc.mallinfo2().hblkhd
for n in (1, 32, 384):
    out = torch.randn(n, 640) @ weight.T
    del out
print((libc.mallinfo2().hblkhd - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_mkl_keeps_no_work_buffers_between_products(monkeypatch: pytest.MonkeyPatch) -> None:
    from chorus_common import allocator

    env = {k: v for k, v in os.environ.items() if k != allocator.MKL_BUFFER_CACHE}

    def held_mb(mode: str) -> int:
        return _probe_mb(MKL_PROBE, mode, env)

    cached = held_mb("cache")
    if cached < 4:
        pytest.skip(f"this torch's BLAS kept no work buffers ({cached} MB held): nothing to disable")
    assert held_mb("disable") < 2, cached
    monkeypatch.setenv(allocator.MKL_BUFFER_CACHE, "0")  # an operator's choice stands
    assert allocator.disable_mkl_buffer_cache() == "0"
