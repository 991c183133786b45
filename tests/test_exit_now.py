"""exit_now: the process ends with the code given, its output out first, even where the output cannot go out."""
from __future__ import annotations

import subprocess
import sys

import pytest


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_output_is_written_before_the_process_ends():
    proc = run("import sys; from mmoe_rec.exit_now import exit_now\n"
               "print('out', end=''); print('err', end='', file=sys.stderr); exit_now(3)")
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out", "err")


@pytest.mark.parametrize("code,expected", [(143, 143), (0, 120)])
def test_a_stream_that_cannot_be_flushed_does_not_keep_a_watcher_thread_from_ending_the_process(code, expected):
    """The SIGTERM watch ends the process from a thread of its own: a flush that raised there ended the thread
    instead, and the process ran on. A failed flush turns a success into 120, as Python's own exit does."""
    proc = run("import sys, threading, time; from mmoe_rec.exit_now import exit_now\n"
               "sys.stderr.close()\n"
               f"threading.Thread(target=exit_now, args=({code},)).start(); time.sleep(30); print('ran on')")
    assert proc.returncode == expected and "ran on" not in proc.stdout
