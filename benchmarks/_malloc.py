"""glibc malloc settings for the benchmarks: keep freed memory in the heap instead of returning it to the OS.

By default glibc serves large allocations (above a dynamic threshold of up to 32 MiB) with a fresh mmap and unmaps
them on free, and trims the heap top on free: every such tensor then pays page faults on first touch, about
10 ms per 32 MiB on this VM, often more than the arithmetic that fills it. The same effect is had without code by
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 in the environment, or with jemalloc / tcmalloc preloaded.
It applies to the whole process, so every contender in a benchmark run gets it alike.
"""
from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
INT_MAX = 2**31 - 1  # mallopt takes a C int: a larger value would wrap (1 << 40 becomes 0, i.e. trim on every free)


def tune_malloc() -> bool:
    """No mmap per allocation, never trim the heap. True when glibc accepted all three settings."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # out-of-range values raise instead of wrapping
    libc.mallopt.restype = ctypes.c_int
    ok = libc.mallopt(M_MMAP_MAX, 0)
    ok &= libc.mallopt(M_TRIM_THRESHOLD, INT_MAX)
    ok &= libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)  # unused while M_MMAP_MAX is 0; set for clarity
    return bool(ok)
