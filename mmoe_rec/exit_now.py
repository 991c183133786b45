"""`exit_now(code)`: end the process at once, its output written out first (the CLI's end, and the SIGTERM watch's)."""
from __future__ import annotations

import os
import sys


def exit_now(code: int) -> None:
    """End the process with `code` once the output is out, without the interpreter's shutdown. Output that cannot
    go out (stdout a pipe whose reader has gone, as in `mmoe-rec --help | true`) makes a successful exit 120, as
    Python's own exit does, with no traceback; a failed flush never keeps the process from ending (called from a
    watcher thread, an exception there would end the thread and leave the process running)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a broken pipe; a stream closed by the job
            code = code or 120
    os._exit(code)
