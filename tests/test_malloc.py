"""mmoe_rec.malloc: glibc keeps freed memory in processes that `mmoe-rec` starts, unless told not to."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mmoe_rec import cli, malloc

# Where does a 64 MiB block come from? With mmap per allocation off, from the heap: the heap's end (sbrk(0)) moves.
PROBE = """
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
{setup}
before = libc.sbrk(0)
block = libc.malloc(64 << 20)
print(libc.sbrk(0) - before >= (64 << 20))
"""


def probe_says(probe: str, setup: str) -> bool:
    """Runs a probe script in a fresh interpreter after `setup`: what it printed, True or False."""
    out = subprocess.run([sys.executable, "-c", probe.format(setup=setup)], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip() == "True"


def heap_served_64mib(setup: str) -> bool:
    return probe_says(PROBE, setup)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_serves_large_blocks_from_the_heap_instead_of_a_fresh_mmap():
    assert not heap_served_64mib("")  # glibc's default: a block this large gets its own mmap
    assert heap_served_64mib("from mmoe_rec import malloc\nassert malloc.keep_freed_memory()")


def test_the_environment_decides_and_bad_values_are_named(monkeypatch):
    monkeypatch.setenv(malloc.ENV_VAR, "default")
    assert malloc.apply_from_env() is False
    monkeypatch.setenv(malloc.ENV_VAR, "")
    with pytest.raises(ValueError, match="MMOE_REC_MALLOC='': expected one of keep, default"):
        malloc.apply_from_env()
    monkeypatch.setenv(malloc.ENV_VAR, "jemalloc")
    with pytest.raises(ValueError, match="MMOE_REC_MALLOC='jemalloc': expected one of keep, default"):
        malloc.apply_from_env()


def test_the_cli_applies_it_before_any_subcommand(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv(malloc.ENV_VAR, raising=False)
    assert cli.main([]) == 2  # no subcommand: usage, after the allocator was set
    assert calls == [1]
    monkeypatch.setenv(malloc.ENV_VAR, "default")
    cli.main([])
    assert calls == [1]


# After a large block is freed, does the heap's end stay where it was (no trim)?
TRIM_PROBE = """
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
{setup}
block = libc.malloc(64 << 20)
top = libc.sbrk(0)
libc.free(block)
print(libc.sbrk(0) == top)
"""


def heap_kept_after_free(setup: str) -> bool:
    return probe_says(TRIM_PROBE, setup)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_never_trims_the_heap():
    assert not heap_kept_after_free("libc.mallopt(-4, 0)")  # from the heap, but glibc's trimming gives it back
    assert heap_kept_after_free("from mmoe_rec import malloc\nassert malloc.keep_freed_memory()")
