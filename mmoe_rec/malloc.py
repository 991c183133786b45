"""glibc malloc for a training or scoring process: keep freed memory in the heap instead of returning it to the OS.

By default glibc serves large allocations (above a dynamic threshold of up to 32 MiB) with a fresh mmap and unmaps
them on free, and trims the heap top on free. A training step allocates the same large tensors (activations,
gradients, GEMM outputs) every step, so each of them pays page faults on first touch again: about 10 ms per 32 MiB
on the 2-vCPU VM of the benchmarks, often more than the arithmetic that fills the tensor. The large MMoE of
`benchmarks/train_throughput.py` trained 41,281 rows/s through Lightning with freed memory kept and 38,029 without
(`--default-malloc`, a run minutes later). The cost: the process keeps its peak heap (no trimming) until it exits.

`mmoe-rec` applies it at start-up for every subcommand; `MMOE_REC_MALLOC=default` leaves glibc as it is. The same
effect is had without code by MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 in the environment, or with
jemalloc / tcmalloc preloaded. Programs that use mmoe-rec as a library can call `keep_freed_memory()` themselves.
"""
from __future__ import annotations

import ctypes
import os

ENV_VAR = "MMOE_REC_MALLOC"
CHOICES = ("keep", "default")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
INT_MAX = 2**31 - 1  # mallopt takes a C int: a larger value would wrap (1 << 40 becomes 0, i.e. trim on every free)


def keep_freed_memory() -> bool:
    """No mmap per allocation, never trim the heap. True when glibc accepted all three settings (False elsewhere,
    e.g. musl or macOS, where nothing is changed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # out-of-range values raise instead of wrapping
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_MAX, 0)
    ok &= mallopt(M_TRIM_THRESHOLD, INT_MAX)
    ok &= mallopt(M_MMAP_THRESHOLD, 1 << 30)  # unused while M_MMAP_MAX is 0; set for clarity
    return bool(ok)


def apply_from_env() -> bool:
    """What `mmoe-rec` does at start-up: keep freed memory unless MMOE_REC_MALLOC=default. True when applied."""
    choice = os.environ.get(ENV_VAR, "keep")
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice == "keep" and keep_freed_memory()
